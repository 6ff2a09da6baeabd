"""Evaluation (§3.3): lm-eval on checkpoints and bundles (`harness`, `bundle_lm`), bundle-vs-checkpoint checks (`verify`), routing metrics and Figures 5–6 (`routing_report`)."""
