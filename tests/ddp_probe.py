"""What tests/test_train_distributed.py runs in each process under `accelerate launch`:
unisd.distributed's worker, and then what this process holds saved to `rank{r}.pt` in
the job's folder (its student's and its teacher's trained weights); every checkpoint the
main process writes is also kept, as `kept-step{N}.pt`, for the resume test."""

import shutil
import sys
from pathlib import Path

import torch
from accelerate import PartialState

import unisd.train as train_mod
from unisd.distributed import main

teachers = []


class Recorded(train_mod.Teacher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        teachers.append(self)


def save_and_keep(path, lm, optimizer, scheduler, teacher, step, *rest):
    save(path, lm, optimizer, scheduler, teacher, step, *rest)
    shutil.copy(path, path.with_name(f"kept-step{step}.pt"))


save = train_mod._save_checkpoint
train_mod.Teacher, train_mod._save_checkpoint = Recorded, save_and_keep
main(sys.argv[1:])
(teacher,) = teachers
held = {
    "student": {n: p.detach().clone() for n, p in teacher.params.items()},
    "teacher": teacher.state_dict(),
}
torch.save(held, Path(sys.argv[1]).with_name(f"rank{PartialState().process_index}.pt"))
