"""A trained round as an MLflow pyfunc model, so that it loads back with one call:

    model = mlflow.pyfunc.load_model("models:/<model id>")   # or "models:/unisd-sft/1"
    model.predict(["Question: ... Answer with the letter."])  # -> the greedy answers

A LoRA round is saved as its adapter plus the path of the base model it was trained on
(like MLflow's own PEFT support, which records the base model instead of copying it:
the base is the model stage's output, hundreds of MB, the adapter a fraction of that).
A round that trained every weight is saved whole. Prompts are rendered with the chat
template the round was trained with, and answers decoded greedily, up to
`max_new_tokens` (`load_model(uri, model_config={"max_new_tokens": 256})` changes it).

MLflow saves this file with the model and runs it to load it ("models from code", no
pickle): hence `set_model` at the end.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import cast

import mlflow.pyfunc
from mlflow.models import set_model

from unisd.config import Config

REQUIREMENTS = ("torch", "transformers", "peft", "mlflow")


class TrainedModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]  # not seen through mlflow.pyfunc's lazy exports
    """The pyfunc wrapper: prompts in, greedy answers out."""

    def load_context(self, context) -> None:
        from unisd.modeling import load_model, load_tokenizer
        from unisd.prompts import PromptBuilder

        config = context.model_config
        if "adapter" in context.artifacts:
            from peft import PeftModel

            base = Path(config["base"])
            if not base.exists():
                raise FileNotFoundError(f"{base}: the base model this adapter was trained on is not there")
            model = PeftModel.from_pretrained(load_model(base, "float32", "auto"), context.artifacts["adapter"])
            self.model, self.tokenizer = model.merge_and_unload().eval(), load_tokenizer(base)
        else:
            self.model = load_model(context.artifacts["model"], "float32", "auto")
            self.tokenizer = load_tokenizer(context.artifacts["model"])
        self.builder = PromptBuilder.for_tokenizer(self.tokenizer, config["template"], config["max_prompt_tokens"])
        self.max_new_tokens = config["max_new_tokens"]

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        from unisd.generation import Sampling, generate

        prompts = [self.builder.encode(text) for text in model_input]
        if too_long := [i for i, ids in enumerate(prompts) if ids is None]:
            raise ValueError(f"prompts {too_long} exceed {self.builder.max_prompt_tokens} tokens")
        return [
            c.text
            for c in generate(
                self.model,
                self.tokenizer,
                cast(list[list[int]], prompts),
                Sampling(self.max_new_tokens),
                stop_strings=self.builder.stop_strings,
                desc="pyfunc predict",
            )
        ]


def save_trained_model(cfg: Config, train_out: Path, base: Path, dest: Path) -> None:
    """Save the round written to `train_out` (trained from `base`) as a pyfunc model in `dest`."""
    lora = (train_out / "adapter").is_dir()
    mlflow.pyfunc.save_model(
        dest,
        python_model=__file__,
        artifacts={"adapter": str(train_out / "adapter")} if lora else {"model": str(train_out / "model")},
        model_config={
            "base": str(Path(base).resolve()),
            "template": cfg.model.template,
            "max_prompt_tokens": cfg.prompts.max_prompt_tokens,
            "max_new_tokens": cfg.eval.max_new_tokens.mcq,
        },
        pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
    )  # not inferred: seconds saved


set_model(TrainedModel())
