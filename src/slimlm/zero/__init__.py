"""Zero: reinforcement learning from verifiable rewards alone (the R1-Zero recipe) on TRL's GRPOTrainer.

Our part is what TRL does not have: tasks with exact verifiers and a held-out split (tasks), the R1-Zero
rewards (rewards), the prompt template (template), held-out accuracy with standard errors (evaluate), the
resumable training run with its metrics log (train) and its curves (plot).
"""
