"""Evaluation: held-out losses and JEPA scores (held_out.py, also run by the trainer), and the
generation-based tasks of tools/evaluate.py: HumanEval (humaneval.py) and image -> code
(image_to_code.py) through the sandbox (sandbox.py), reasoning answers (reasoning.py)."""
