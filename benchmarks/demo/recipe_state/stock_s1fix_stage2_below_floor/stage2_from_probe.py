# stage 2 as run for this folder: python stage2_from_probe.py runs/s1probe/lr2e-4 s2_from_lr2e-4 (from the repo root)
import sys, json
from pathlib import Path
from focusvlm.config import FocusConfig
from focusvlm.train.runner import train
from focusvlm.demo.recipe import DemoRecipe, _stage_overrides
start, name = sys.argv[1], sys.argv[2]
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
src = Path("runs/short256")
files = json.loads((src/"data"/"easyvqa_manifest.json").read_text())["files"]
recipe = DemoRecipe(bf16=False, sentence_per_batch=0, text_per_batch=0)
ov = {**_stage_overrides(recipe, "finetune"), "save_steps": 100000, **extra}
train(stage="finetune", data=str(src/"data"/"stage2_mix.json"), image_folder=files["image_folder"], output_dir=f"runs/s1probe/{name}",
      model=start, focus_config=FocusConfig(), overrides=ov, lora=True, progress=False)
