"""Recipes: named sets of component settings, resolved into one validated `Method`.

A recipe is a partial `Method` on top of the defaults, which are plain on-policy
self-distillation (docs/method.md §1): student samples, frozen teacher with the gold
demonstration in context, forward KL at T=0.7. `params.yaml`'s `components:` may
switch any component on or off on top of the chosen recipe.

`RECIPES` is the one table of recipes: each recipe's settings, with what it is and its
section of docs/method.md in `ABOUT`. The README's recipes table is `recipe_table()`'s
output (tests/test_recipes.py compares them), and tests/test_recipes.py checks every
recipe against the components docs/method.md §1–§3 state.

Components that any training recipe can take through `components:` (ours, off by default):

| component | what it does |
|---|---|
| gold_mix: f | format stabilisation: for a seeded round(f · n) of the round's n prompts, the gold response is added as an extra item trained with cross-entropy (SFT) beside the recipe's own items, as GKD mixes gold sequences in; the same stabilisation can be given to every baseline |
| skip_first_tokens: k | the teacher-based terms (divergence, feature matching, contrastive) skip each completion's first k tokens (teacher recipes only) |
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherCfg(Part):
    kind: Literal["frozen", "ema"] = "frozen"
    ema_every: int = Field(10, ge=1, description="optimizer steps between EMA updates")
    ema_beta: float = Field(0.9, ge=0.0, le=1.0)


class AgreementCfg(Part):
    enabled: bool = False
    level: Literal["token", "sequence"] = "token"
    contexts: Literal["random", "retrieval", "induction"] = "retrieval"
    k: int = Field(3, description="number of auxiliary contexts (teachers); at least 2")
    gamma: float = Field(1.0, ge=0.0)
    stat: Literal["var", "range"] = "var"
    filter_quantile: float = Field(
        1.0, gt=0.0, le=1.0, description="drop trajectories above this disagreement quantile"
    )
    normalize: Literal["tokens", "weight"] = "tokens"

    def model_post_init(self, _: Any) -> None:
        if self.enabled and self.k < 2:
            raise ValueError(f"agreement.k must be at least 2 to measure agreement between teachers, got {self.k}")


class ContrastiveCfg(Part):
    enabled: bool = False
    weight: float = Field(0.1, ge=0.0)
    margin: float = Field(0.5, ge=0.0)
    negatives: Literal["programmatic", "self"] = "programmatic"


class FeatureCfg(Part):
    mode: Literal["none", "joint", "repr"] = "none"
    weight: float = Field(0.1, ge=0.0)


class ClipCfg(Part):
    mode: Literal["none", "static", "quantile"] = "none"
    tau: float = Field(10.0, gt=0.0)
    q: float = Field(0.99, gt=0.0, le=1.0)


class Method(Part):
    """What the train stage optimises and on which sequences."""

    loss: Literal["none", "sft", "distill"] = "distill"
    data: Literal["gold", "self_sample", "on_policy", "mixed"] = "on_policy"
    on_policy_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of on-policy sequences in 'mixed'")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    alpha: float = Field(0.5, gt=0.0, lt=1.0, description="JSD mixture weight (GKD's beta)")
    temperature: float = Field(0.7, gt=0.0, description="distillation temperature T")
    sample_temperature: float | None = Field(None, gt=0.0, description="None: generation.temperature")
    sample_top_p: float | None = Field(None, gt=0.0, le=1.0, description="None: generation.top_p")
    gold_mix: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of the round's prompts whose gold response is "
        "added as an extra SFT item (format stabilisation)",
    )
    skip_first_tokens: int = Field(
        0, ge=0, description="completion tokens at the start left out of the teacher-based loss terms"
    )
    teacher: TeacherCfg = TeacherCfg()
    agreement: AgreementCfg = AgreementCfg()
    contrastive: ContrastiveCfg = ContrastiveCfg()
    feature: FeatureCfg = FeatureCfg()
    clip: ClipCfg = ClipCfg()

    def model_post_init(self, _: Any) -> None:
        uses_teacher = self.loss == "distill"
        for name, on in (
            ("agreement", self.agreement.enabled),
            ("contrastive", self.contrastive.enabled),
            ("feature", self.feature.mode != "none"),
            ("ema teacher", self.teacher.kind == "ema"),
            ("clip", self.clip.mode != "none"),
            ("skip_first_tokens", self.skip_first_tokens > 0),
        ):
            if on and not uses_teacher:
                raise ValueError(f"{name} needs a teacher, but loss is {self.loss!r} (use loss: distill)")
        if self.gold_mix > 0 and self.loss == "none":
            raise ValueError("gold_mix adds training items, but loss is 'none' (this recipe trains nothing)")

    @property
    def samples(self) -> bool:
        """Whether the student's own samples are generated each round."""
        return self.loss != "none" and self.data != "gold"


EMA_SDFT = {"kind": "ema", "ema_every": 10, "ema_beta": 0.9}


def _agreement(level: str, contexts: str) -> dict[str, Any]:
    return {"agreement": {"enabled": True, "level": level, "contexts": contexts, "k": 3, "gamma": 0.01}}


RECIPES: dict[str, dict[str, Any]] = {
    "base": {"loss": "none"},
    "sft": {"loss": "sft", "data": "gold"},
    "ssd": {"loss": "sft", "data": "self_sample", "sample_temperature": 1.0, "sample_top_p": 0.95},
    "sd": {},
    "sdft": {"teacher": EMA_SDFT},
    "gkd": {"divergence": "jsd", "alpha": 0.5, "data": "mixed", "on_policy_fraction": 0.5},
    "opsd": {"divergence": "jsd", "alpha": 0.5},
    **{
        f"agreement_{lvl[:3]}_{ctx}": _agreement(lvl, ctx)
        for lvl in ("token", "sequence")
        for ctx in ("random", "retrieval", "induction")
    },
    "ema": {"teacher": EMA_SDFT},
    "contrastive": {"contrastive": {"enabled": True, "weight": 0.1, "margin": 0.5}},
    "match_joint": {"feature": {"mode": "joint", "weight": 0.1}},
    "match_repr": {"feature": {"mode": "repr", "weight": 1.0}},
    "clip": {"clip": {"mode": "static", "tau": 10.0}},
    "unisd-full": {
        "divergence": "forward_kl",
        "agreement": {"enabled": True, "level": "token", "contexts": "retrieval", "k": 3, "gamma": 0.001},
        "teacher": {"kind": "ema", "ema_every": 10, "ema_beta": 0.98},
        "feature": {"mode": "joint", "weight": 0.01},
        "contrastive": {"enabled": True, "weight": 0.01, "margin": 0.1},
        "clip": {"mode": "none"},
    },
}
# What each recipe is, and where docs/method.md defines it (the README's table, `recipe_table`).
ABOUT: dict[str, tuple[str, str]] = {
    "base": ("§3", "the untouched model, same prompts: no training"),
    "sft": ("§3", "cross-entropy on the gold completions"),
    "ssd": ("§3", "cross-entropy on the model's own samples, at a raised temperature with top-p"),
    "sd": ("§1", "plain on-policy self-distillation: frozen teacher, forward KL at T=0.7 (the base of the ablations)"),
    "sdft": ("§3", "on-policy, EMA teacher, full-vocabulary forward KL"),
    "gkd": ("§3", "generalized JSD on a mix of on-policy samples and gold sequences, frozen teacher"),
    "opsd": ("§3", "generalized JSD on student rollouts, fixed initial teacher"),
    **{
        f"agreement_{lvl[:3]}_{ctx}": ("§2.1", f"{lvl}-level agreement weights from {ctx} contexts, on sd")
        for lvl in ("token", "sequence")
        for ctx in ("random", "retrieval", "induction")
    },
    "ema": ("§2.2", "EMA teacher, on sd"),
    "contrastive": ("§2.3", "token-level contrastive term with verified programmatic negatives, on sd"),
    "match_joint": ("§2.4", "feature matching added to the divergence, on sd"),
    "match_repr": ("§2.4", "feature matching instead of the divergence, on sd"),
    "clip": ("§2.5", "static divergence clipping, on sd"),
    "unisd-full": (
        "§2.6",
        "the integrated recipe: retrieval token agreement, EMA teacher, joint feature matching, "
        "contrastive term; forward KL, no clipping",
    ),
}
BASELINES = ("base", "sft", "ssd", "sdft", "gkd", "opsd")
COMPONENTS = (
    "agreement_tok_random",
    "agreement_tok_retrieval",
    "agreement_tok_induction",
    "agreement_seq_random",
    "agreement_seq_retrieval",
    "agreement_seq_induction",
    "ema",
    "contrastive",
    "match_joint",
    "match_repr",
    "clip",
)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def method_dict(recipe: str, components: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe's settings with `components` overrides on top (not yet validated)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return deep_merge(RECIPES[recipe], components or {})


def _flow(value: Any) -> str:
    """A setting as YAML flow text: `{kind: ema, ema_every: 10}`, `true`, `0.001`."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def recipe_table() -> str:
    """The README's recipes table, one row per recipe of `RECIPES`."""
    rows = ["| recipe | [method](docs/method.md) | what it is | sets |", "|---|---|---|---|"]
    for name, settings in RECIPES.items():
        section, about = ABOUT[name]
        sets = ", ".join(f"`{key}: {_flow(value)}`" for key, value in settings.items()) or "the defaults"
        rows.append(f"| `{name}` | {section} | {about} | {sets} |")
    return "\n".join(rows) + "\n"
