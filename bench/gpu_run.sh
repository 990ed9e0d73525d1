#!/bin/bash
# One batch of GPU work: tests, then benchmarks. Logs and results under $OUT (a folder the caller collects), written
# as they go, so that a step cut by its time limit still leaves what it got to.
# usage: bench/gpu_run.sh [tests] [prod] [backend] [sweep] [quick] [full] [model] [modelfull] [model7b] [model13b] [profile] [mlp1nofuse] [mlp1] [mlp1full] [mlptp] [demo] [gidx] [new] [serial] [wgmma] [tiled] [sweepms] [host] [layout] [modellayout] [mid] [tile128] [boxes] [probeboxes]
#   MLP_ARGS: extra bench_mlp.py arguments for mlptp (e.g. --quick)
#   backend: the backend's GPU tests (TP 1 rewrite + lowering, torch of the machine)
#   serial:  GPU tests of every kernel's store path (forced configs, dispatch, production shapes, SwiGLU, one-launch split-K)
#   wgmma:   GPU tests of the Hopper kernel (forced configs, SwiGLU)   sweepms: bench_kernels --sweep at $SWEEP_MS only
#   tiled:   GPU tests on tiled words (layout.py), then N-major against tiled at M = 1..64 on every shape
#   new:     GPU tests of the newest kernel work (x[P1] through perm, multi-row GEMV, one-launch split-K, forced configs)
#   model:   bench_model.py --quick (Llama-2-7B shapes, TP 1)     modelfull: Llama-2-7B and 13B (model7b, model13b: one)
#   profile: top CUDA kernels of a prefill per bench_model variant  mlp1nofuse: mlp1 with gate and up unfused
#   mlp1:    bench_mlp.py --single-gpu --quick                    mlp1full: every model and M
#   host:    bench_host.py --cprofile (host vs GPU time per call, Llama-2-13B MLP shapes)
#   mlptp:   bench_mlp.py under torchrun over every visible GPU (NCCL, NVLink multicast off)
#   layout:  the backend on tiled against N-major words: bench_mlp.py --single-gpu, both models, M = 1, 4, 16
#   modellayout: bench_model.py --quick (its tpaware / tpaware_nmajor pair)
#   mid:     33-64 tokens on tiled words: the dispatch beside the decode kernel's 64-token tile (probe_mid.py), matmul
#            and SwiGLU
#   tile128: 100-128 tokens: the dispatch beside a 128 x 64 tile on one warpgroup at splits 1 / 2 / 4 (probe_mid.py)
#   boxes:   GPU tests of x's TMA boxes (forced X_BOX and whole tiles, matmul and SwiGLU) and of the stream-K form
#   probeboxes: 33-240 tokens: the dispatch beside whole-tile boxes and the 128 x 64 tile (probe_boxes.py; BOX_MS:
#            its token counts)
export PYTHONPATH=. PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > $OUT/nvidia_smi.txt 2>&1
for step in "$@"; do
  case $step in
    tests) timeout 420 python -m pytest tests/test_kernels.py -m gpu -q --maxfail=8 -p no:cacheprovider > $OUT/pytest_gpu.log 2>&1; tail -5 $OUT/pytest_gpu.log ;;
    new) timeout 360 python -m pytest -m gpu tests/test_kernels.py tests/test_backend_gpu.py -k "perm or rows or serial or kernel_gpu_configs or fused_swiglu_lowering" -q -p no:cacheprovider > $OUT/pytest_new.log 2>&1; tail -3 $OUT/pytest_new.log ;;
    serial) timeout ${TESTS_TIMEOUT:-300} python -m pytest -m gpu tests/test_kernels.py -k "serial or kernel_gpu_configs or perm_gpu_dispatch or production_configs or swiglu_gpu" -q -p no:cacheprovider > $OUT/pytest_serial.log 2>&1; tail -3 $OUT/pytest_serial.log ;;
    wgmma) timeout ${TESTS_TIMEOUT:-200} python -m pytest -m gpu tests/test_kernels.py -k wgmma -q -p no:cacheprovider > $OUT/pytest_wgmma.log 2>&1; tail -3 $OUT/pytest_wgmma.log ;;
    tiled) timeout ${TESTS_TIMEOUT:-300} python -m pytest -m gpu tests/test_kernels.py -k tiled -q -p no:cacheprovider > $OUT/pytest_tiled.log 2>&1; tail -3 $OUT/pytest_tiled.log
      timeout 200 python bench/bench_kernels.py --ms 1,2,16,32,64 --providers tpaware,tpaware_tiled --out $OUT/kernels_tiled.json > $OUT/kernels_tiled.log 2>&1; tail -3 $OUT/kernels_tiled.log ;;
    sweepms) timeout ${SWEEP_TIMEOUT:-400} python bench/bench_kernels.py --sweep --sweep-ms $SWEEP_MS --out $OUT/sweep_ms.json > $OUT/sweep_ms.log 2>&1; tail -3 $OUT/sweep_ms.log ;;
    gidx) timeout 200 python -m pytest tests/test_kernels.py -m gpu -k gidx -q -p no:cacheprovider > $OUT/pytest_gidx.log 2>&1; tail -3 $OUT/pytest_gidx.log ;;
    prod) timeout 110 python -m pytest tests/test_kernels.py -m gpu -k production -q -p no:cacheprovider > $OUT/pytest_prod.log 2>&1; tail -3 $OUT/pytest_prod.log ;;
    sweep) timeout 540 python bench/bench_kernels.py --sweep --out $OUT/sweep.json > $OUT/sweep.log 2>&1; tail -3 $OUT/sweep.log ;;
    quick) timeout 300 python bench/bench_kernels.py --quick --out $OUT/quick.json > $OUT/quick.log 2>&1; tail -50 $OUT/quick.log ;;
    backend) timeout 240 python -m pytest tests/test_backend_gpu.py tests/test_instances.py -q -p no:cacheprovider > $OUT/pytest_backend.log 2>&1; tail -3 $OUT/pytest_backend.log ;;
    model) timeout 400 python bench/bench_model.py --quick --out $OUT/model.json > $OUT/model.log 2>&1; tail -8 $OUT/model.log ;;
    mlp1) timeout 400 python bench/bench_mlp.py --single-gpu --quick --out $OUT/mlp_single.json > $OUT/mlp_single.log 2>&1; tail -20 $OUT/mlp_single.log ;;
    model13b) timeout ${MODEL_TIMEOUT:-540} python bench/bench_model.py --models llama2-13b --out $OUT/model13b.json > $OUT/model13b.log 2>&1; tail -8 $OUT/model13b.log ;;
    model7b) timeout ${MODEL_TIMEOUT:-540} python bench/bench_model.py --models llama2-7b --out $OUT/model7b.json > $OUT/model7b.log 2>&1; tail -8 $OUT/model7b.log ;;
    profile) timeout 300 python bench/profile_prefill.py > $OUT/profile.log 2>&1; grep "^==" $OUT/profile.log ;;
    mlp1nofuse) timeout 400 python bench/bench_mlp.py --single-gpu --quick --no-fuse-swiglu --out $OUT/mlp_single_nofuse.json > $OUT/mlp_single_nofuse.log 2>&1; tail -12 $OUT/mlp_single_nofuse.log ;;
    modelfull) timeout ${MODEL_TIMEOUT:-540} python bench/bench_model.py --out $OUT/model.json > $OUT/model.log 2>&1; tail -8 $OUT/model.log ;;
    mlp1full) timeout ${MLP_TIMEOUT:-540} python bench/bench_mlp.py --single-gpu --out $OUT/mlp_single.json > $OUT/mlp_single.log 2>&1; tail -20 $OUT/mlp_single.log ;;
    mlptp) gpus=$(python -c "import torch; print(torch.cuda.device_count())")
      timeout ${MLP_TIMEOUT:-540} torchrun --standalone --nproc-per-node $gpus bench/bench_mlp.py $MLP_ARGS --out $OUT/mlp_tp$gpus.json > $OUT/mlp_tp$gpus.log 2>&1; tail -20 $OUT/mlp_tp$gpus.log ;;
    demo) python -m pip install -q --no-deps --no-build-isolation -e . > $OUT/pip.log 2>&1  # the demo uses the entry point
      timeout 300 python -m tpaware_compile demo > $OUT/demo.log 2>&1; tail -15 $OUT/demo.log ;;
    host) timeout 300 python bench/bench_host.py --cprofile --out $OUT/host.json > $OUT/host.log 2>&1; grep -v '^ ' $OUT/host.log | head -40 ;;
    layout) timeout ${MLP_TIMEOUT:-400} python bench/bench_mlp.py --single-gpu --models llama70b,granite20b --ms 1,4,16 --out $OUT/mlp_single_layout.json > $OUT/mlp_single_layout.log 2>&1; grep tpaware $OUT/mlp_single_layout.log | tail -40 ;;
    modellayout) timeout 400 python bench/bench_model.py --quick --out $OUT/model_layout.json > $OUT/model_layout.log 2>&1; tail -8 $OUT/model_layout.log ;;
    mid) timeout 200 python bench/probe_mid.py --ms 33,40,41,48,56,64 --splits "" --out $OUT/probe_mid.json > $OUT/probe_mid.log 2>&1
      timeout 200 python bench/probe_mid.py --ms 41,48,64 --swiglu --out $OUT/probe_mid_swiglu.json >> $OUT/probe_mid.log 2>&1
      grep -c WRONG $OUT/probe_mid.log ;;
    tile128) timeout 300 python bench/probe_mid.py --ms 100,104,112,120,128 --tile 128x64 --splits 1,2,4 --out $OUT/probe_tile128.json > $OUT/probe_tile128.log 2>&1
      grep -c WRONG $OUT/probe_tile128.log ;;
    boxes) timeout ${TESTS_TIMEOUT:-300} python -m pytest -m gpu tests/test_kernels.py -k "x_boxes or stream" -q -p no:cacheprovider > $OUT/pytest_boxes.log 2>&1; tail -3 $OUT/pytest_boxes.log ;;
    probeboxes) timeout ${PROBE_TIMEOUT:-400} python bench/probe_boxes.py --ms ${BOX_MS:-33,40,48,56,63,72,80,96,100,112,120,160,200,240} --out $OUT/probe_boxes.json > $OUT/probe_boxes.log 2>&1
      grep -c WRONG $OUT/probe_boxes.log ;;
    full) timeout ${FULL_TIMEOUT:-560} python bench/bench_kernels.py --out $OUT/full.json > $OUT/full.log 2>&1; tail -30 $OUT/full.log ;;
  esac
done
