"""The student folder: the contract between `trainer fit` and `evaluation` (and stock diffusers), like `shards/`.

A student folder holds `distillation.json` (what the student is, where it came from, how to sample it), a
pipeline folder in its teacher's layout, which loads in the teacher's pipeline class (a full student, or a LoRA
student's merged pipeline), the LoRA files of a LoRA student (diffusers and kohya/ComfyUI formats) and a model
card (README.md).
"""
