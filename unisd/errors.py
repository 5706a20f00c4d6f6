"""The errors that mean bad input: the message names the file, key or row at fault.

The `unisd` command prints them as one line and exits with status 2, and the Prefect
tasks never retry them: they fail the same way every time.
"""

from unisd.artifacts import IntegrityError
from unisd.assets import AssetError
from unisd.config import ConfigError
from unisd.data.schema import DataError
from unisd.report import ReportError
from unisd.train import TrainingError

INPUT_ERRORS = (ConfigError, DataError, AssetError, TrainingError, ReportError, IntegrityError)
