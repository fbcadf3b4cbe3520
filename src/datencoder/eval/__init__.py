"""The evaluation harness: targets, scoring (emoji evaluator, paper metrics), records, reports and
the baselines (Textual Inversion, DreamBooth-LoRA) on the same optimisation loop as tuning."""
