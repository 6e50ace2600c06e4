#!/bin/bash
# Before (/tmp/snap = f5ad487 + the feed-thread fix only) and after (/work/main) train-step
# memory for the U-Net sharding and the vocab padding, 0.16B on v5p-128, dense XLA attention.
export ALLOW_MULTIPLE_LIBTPU_LOAD=1
PY=/work/venv-aot/bin/python
for side in before after; do
  dir=/work/main; [ $side = before ] && dir=/tmp/snap
  cd $dir
  nice -n 5 $PY -m launch.compile --config=experiments/registry.py:transfusion_0.16B_unet_p2 --topology=v5p-128 \
     --config.model.attention_kernel=xla --nocount_flops --out=/tmp/beforeafter/unet_$side.json > /tmp/beforeafter/unet_$side.log 2>&1
  nice -n 5 $PY -m launch.compile --config=experiments/registry.py:transfusion_0.16B --topology=v5p-128 \
     --config.model.attention_kernel=xla --config.mesh.tensor=4 --nocount_flops --out=/tmp/beforeafter/tensor4_$side.json > /tmp/beforeafter/tensor4_$side.log 2>&1
done
echo done > /tmp/beforeafter/DONE
