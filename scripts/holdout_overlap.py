# Usage: python scripts/holdout_overlap.py brick   (a quick run, lr 1e-3, 12 epochs on 160 crops)
"""Memorisation vs region shift: train on the left part of the training strip only, then score
(a) crops from the right part of the training strip (pixels never seen), (b) left-part holdout
crops overlapping training pixels, (c) good test crops."""
import numpy as np, torch, sys
from PIL import Image
from models.demo_data import CropSpec, extract_crop, load_texture
from models.preprocessing import resize_for_model
from models.msflow import MSFlow, MSFlowConfig
torch.manual_seed(0); torch.set_num_threads(2)
cat=sys.argv[1]; photo=load_texture(cat); rng=np.random.default_rng(0)
def crops(n, xs, ys, tr=(0,)):
    out=[]
    for _ in range(n):
        spec=CropSpec(int(rng.integers(*ys)), int(rng.integers(*xs)), int(rng.choice(tr)))
        out.append(resize_for_model(Image.fromarray(extract_crop(photo,spec,224)).convert('RGB'),256))
    return np.stack(out)
tr=(0,1,2,3,4,5,6,7) if cat!='brick' else (0,2,4,6)
train=crops(160,(0,33),(0,57),tr)      # left part: cols [0,256)
left_hold=crops(20,(0,33),(0,57),tr)   # overlaps training pixels
right=crops(20,(256,289),(0,57),tr)    # cols [256,512): unseen pixels, same strip
test=crops(20,(0,289),(288,289),tr)    # test strip
m=MSFlow(MSFlowConfig())
with torch.no_grad(): F=[torch.cat(x) for x in zip(*[m.features(torch.from_numpy(train[i:i+16])) for i in range(0,160,16)])]
opt=torch.optim.Adam(m.flow_parameters(), lr=1e-3)
for ep in range(12):
    perm=torch.randperm(160)
    for i in range(0,160,8):
        idx=perm[i:i+8]; zs,ld=m.flow([f[idx] for f in F]); loss=m.nll_loss(zs,ld)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.flow_parameters(),2); opt.step()
m.eval()
def sc(x):
    with torch.no_grad(): o=m(torch.from_numpy(x), paper_maps=False)
    return float(o['image_score_log'].median()), float(o['anomaly_map'].median())
print(cat, 'median (score_log, map): left holdout', sc(left_hold), ' right unseen', sc(right), ' test strip', sc(test))
