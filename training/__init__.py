"""Building model directories: the shapes data set, the VQ-VAE and transformer trainers, the
adherence scorer and the example grid (the demo model in `model/zoo/shapes` comes from here).

    python -m training.train       train and export a model directory (see training/train.py)
    python -m training.adherence   score a model on held-out prompts (JSON report)
    python -m training.grid        draw docs/examples.png

It imports `model` (inference code) for the architecture and the pipeline; nothing in `model`,
`app` or `worker` imports it.
"""
