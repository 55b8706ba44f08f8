from pathlib import Path
from focusvlm.config import FocusConfig
from focusvlm.demo import recipe as R
out = Path("runs/s1fix")
rec = R.DemoRecipe(pretrain_lr=2e-4, pretrain_steps=40, sentence_per_batch=0, text_per_batch=0, refresh_steps=0, consolidate_steps=0, bf16=False)
R._pack(out/"stock"/"pretrain", out/"stock"/"finetune", out/"stock"/"stage2", "stock", FocusConfig(), rec)
R._check(out, out/"stock"/"stage2", rec, print, out/"stock"/"finetune")
