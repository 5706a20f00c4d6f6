"""The code that runs inside the sandbox (and, for `init`, in its namespaces before the
program starts).

Standard library only, relative imports only: inside the sandbox this folder is mounted
read-only as the package `inside` (nothing else of the project is visible there), on the
host it is `unisd.sandbox.inside`. Nothing here is trusted once the candidate's code has
started: every byte it sends back is checked by the host (`unisd.sandbox.judge`).
"""
