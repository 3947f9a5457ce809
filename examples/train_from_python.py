"""Train from Python, then load the checkpoint, sample and evaluate it: the Python API.

    python examples/train_from_python.py [key=value ...]      # e.g. trainer.max_steps=3000
"""
import sys

import dgm_scale
from dgm_scale.tracking import samples_to_image

# The default job (a DCGAN on the digits), shortened; any config file and overrides work
# (overrides as "key=value" strings, or a dict {"trainer.max_steps": 300}).
overrides = ["trainer.max_steps=300", "eval.every=0", "run.name=from-python", "tracking.wandb.mode=disabled"]
cfg = dgm_scale.load_config(None, overrides + sys.argv[1:])
result = dgm_scale.train(cfg)
print(f"trained {result.iterations} iterations in {result.seconds:.0f} s -> {result.checkpoint}")

model = dgm_scale.load_module(result.checkpoint)
images = model.sample(64, seed=0)  # [64, 1, 16, 16] in [-1, 1], the EMA generator's
samples_to_image(images).save(result.run_dir / "python-samples.png")
raw = model.sample(64, seed=0, variant="raw")  # the raw generator, same latents

scores = dgm_scale.evaluate(result.checkpoint, num_samples=500)
print({name: round(value, 3) for name, value in scores.items() if name in ("fid", "raw/fid", "precision", "recall")})
