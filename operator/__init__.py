"""tandem.operator"""
