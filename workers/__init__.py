"""tandem.workers"""

if __name__ != "tandem.workers":
    # The repository root is on sys.path: this folder is the installed package
    # tandem.workers, never a top-level `workers` (one import path per module).
    raise ImportError(f"import tandem.workers, not {__name__}: workers/ installs as tandem.workers")
