"""Prefect's side of the pipeline: tasks, flows, serving.

Layered one way: the flows (`pipeline`, `study`) call the chain (`unisd.chain`), the
chain calls the stages through a `run_step` that the flow passes in (`runner`: a cached
Prefect task per stage, made from the stage registry in `tasks`), and nothing below
calls back up. `recovery` marks the runs of killed processes Crashed; `serve` serves the
deployments (`pipeline/<recipe>`, `compare/compare`, `ablation/ablation`).
"""
