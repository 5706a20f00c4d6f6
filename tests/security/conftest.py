"""A host worth attacking: a secret (in a file and in the evaluator's environment), a
canary file, a package to poison standing for the project's own, and a bystander
process of the evaluator's user."""

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Host:
    outside: Path
    secret: str
    bystander: int

    def fields(self) -> dict:
        """What the hostile programs' $-placeholders name."""
        return {
            "outside": str(self.outside),
            "secret_file": str(self.outside / "secret.txt"),
            "canary": str(self.outside / "canary.txt"),
            "package_init": str(self.outside / "pkg" / "__init__.py"),
            "evaluator": os.getpid(),
            "bystander": self.bystander,
        }


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    secret = "s3cr3t-" + secrets.token_hex(8)
    (outside / "secret.txt").write_text(secret)
    (outside / "canary.txt").write_text("canary, untouched")
    (outside / "pkg").mkdir()
    (outside / "pkg" / "__init__.py").write_text('"""a package the host imports"""\n')
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNISD_TEST_SECRET", secret)
        yield Host(outside, secret, bystander.pid)
    bystander.kill()
    bystander.wait()
