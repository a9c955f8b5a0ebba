"""Does the calibration made on held-out normals transfer to the test set's good images?

Scores the run's held-out normal images and the category's good test images, compares their
anomaly-map and image-score levels with the exported calibration, and reports how the
service's verdicts and defect regions would come out on the test set.

    python scripts/calibration_transfer.py brick runs/demo/brick model_store/brick/1
"""
import numpy as np, torch, sys
from models.data import MVTecCategory, load_images, load_masks
from models.manifest import Manifest
from models.runs import load_model
from models.evaluate import predict
from service.pipeline.regions import find_regions, box_mask, RegionParams
torch.set_num_threads(2)
cat, run, version = sys.argv[1], sys.argv[2], sys.argv[3]
man=Manifest.read(version); cal=man.calibration
model,_=load_model(run)
s=MVTecCategory('data/demo',cat).test_samples()
imgs=load_images(s,256); masks=load_masks(s,224)
pred=predict(model, imgs, keys=("anomaly_map",), progress=False)
stats={}
for i,smp in enumerate(s):
    regs=find_regions(pred['anomaly_map'][i], cal, (224,224), RegionParams())
    bm=box_mask(regs,(224,224)); m=masks[i]
    iou=(bm&m).sum()/max((bm|m).sum(),1)
    cover=(bm&m).sum()/max(m.sum(),1)
    stats.setdefault(smp.defect_type,[]).append((len(regs)>0, iou, cover, bm.mean()))
for t,v in stats.items():
    a=np.array(v,dtype=float); print(f"{t:8s} with regions {a[:,0].mean():.0%}  IoU {a[:,1].mean():.2f}  mask covered {a[:,2].mean():.0%}  box area {a[:,3].mean():.0%}")
g=np.array([smp.label==0 for smp in s])
print('calib map_low', round(cal.map_low,3), 'pixel_thr', round(cal.pixel_threshold,3), 'map_high', round(cal.map_high,3))
am=pred['anomaly_map']
print('test good map p50', round(float(np.median(am[g])),3), 'p99.9', round(float(np.percentile(am[g],99.9)),3))
import json
hold=json.load(open(f'{run}/holdout.json'))
from models.data import Sample
from pathlib import Path
hs=[Sample(Path(p),0,'good') for p in hold]
hp=predict(model, load_images(hs,256), keys=("anomaly_map","image_score_log"), progress=False)
print('holdout map p50', round(float(np.median(hp['anomaly_map'])),3), 'p99.9', round(float(np.percentile(hp['anomaly_map'],99.9)),3))
tp=predict(model, imgs[g], keys=("image_score_log",), progress=False)
print('score thr', round(cal.threshold,3), 'holdout scores median', round(float(np.median(hp['image_score_log'])),3), 'test good median', round(float(np.median(tp['image_score_log'])),3), 'test good above thr', float((tp['image_score_log']>=cal.threshold).mean()))
