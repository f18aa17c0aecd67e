"""casa6 stage workers, each run as ``python -m stages.<name> --request REQUEST.json``.

These modules run in the casa6 interpreter (which may be a separate environment); they
import only the standard library, numpy, pyuvdata, casacore and CASA, never ``supervisor``.
"""
