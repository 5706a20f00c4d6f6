"""What tests/test_train_distributed.py runs in each process under `accelerate launch`:
unisd.distributed's worker, and then what this process holds saved to `rank{r}.pt` in
the job's folder (its student's and its teacher's trained weights, whole: gathered when
sharded); every checkpoint the main process writes is also kept, as `kept-step{N}.pt`,
for the resume test."""

import shutil
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from torch.distributed.tensor import DTensor

import unisd.train as train_mod
from unisd.distributed import main
from unisd.sharding import full_state

teachers = []


class Recorded(train_mod.Teacher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        teachers.append(self)
        # the decoder layers' parameters as training starts: elements this process holds, elements in all
        layers = [p for n, p in self.model.named_parameters() if ".layers." in n]
        self.layers = [
            sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in layers),
            sum(p.numel() for p in layers),
        ]


def save_and_keep(path, state):
    save(path, state)
    shutil.copy(path, path.with_name(f"kept-step{state['step']}.pt"))


save = train_mod._save_checkpoint
train_mod.Teacher, train_mod._save_checkpoint = Recorded, save_and_keep
main(sys.argv[1:])
(teacher,) = teachers
held = {
    "student": full_state(teacher.params),
    "teacher": teacher.state_dict(),
    "layers": teacher.layers,
}
torch.save(held, Path(sys.argv[1]).with_name(f"rank{PartialState().process_index}.pt"))
