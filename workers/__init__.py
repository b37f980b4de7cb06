"""tandem.workers"""
