# stage 1 as run for this folder: python stage1_probe.py 2e-4 40 lr2e-4 (from the repo root; reads runs/short256)
import sys, json
from pathlib import Path
from focusvlm.config import FocusConfig
from focusvlm.train.runner import train
from focusvlm.demo.recipe import DemoRecipe, _stage_overrides
lr, steps, name = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
src = Path("runs/short256")
files = json.loads((src/"data"/"easyvqa_manifest.json").read_text())["files"]
ov = {**_stage_overrides(DemoRecipe(bf16=False), "pretrain"), "learning_rate": lr, "max_steps": steps}
train(stage="pretrain", data=files["captions"], image_folder=files["image_folder"], output_dir=f"runs/s1probe/{name}",
      model=str(src/"base"), focus_config=FocusConfig(), overrides=ov, progress=False)
