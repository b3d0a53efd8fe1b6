"""Benchmarks: the programs behind BENCHMARKS.md's measured numbers.

Each is run from the repository root as a module, with the stage scripts' CLI
conventions (one dataclass config: dashed options, `--help` shows every default,
`--config FILE.json` loads overrides, the resolved config is printed at start):

    python -m bench.data [--append BENCHMARKS.md]        stage 0: BPE training and MinHash/LSH vs
                                                         HF tokenizers and datasketch, and the whole
                                                         default data.prepare (pip install datasketch)
    python -m bench.data_engines [--mb 100] [--append BENCHMARKS.md]
                                                         data.prepare MB/s by engine (local, Ray with 1 and
                                                         2 workers), dedup memory by document count
                                                         (pip install -r requirements-scale.txt)
    python -m bench.pretrain [--steps 40] [--append BENCHMARKS.md]
                                                         train_pretrain.py's tokens/s vs a minimal
                                                         PyTorch loop (MFU on CUDA)
    python -m bench.ppo --init runs/sft --reward-model runs/rm [--ks 2,4,8,16]
                                                         PPO step time per rollout token vs group size k
    python -m bench.serve --ckpt DIR [--concurrency 1,4,8,16]
                                                         serving throughput and time to first token
                                                         through the HTTP server (needs httpx); with
                                                         --llama-server PATH, llama.cpp side by side
    python -m bench.decode --ckpt DIR [--threads 1]      a decode step's time: the model's forward, the
                                                         fused step (float32, int8), matmul and dispatch floors
    python -m bench.int8_agreement --ckpt runs/ppo       greedy answers served with int8 weights vs float32,
                                                         judged on held-out prompts
    python -m bench.store [--sizes 1000,100000,1000000] [--db-url postgresql://...] [--append BENCHMARKS.md]
                                                         feedback POST time against 10^3-10^6 logged requests
                                                         and generation tokens/s while unknown ids are posted,
                                                         SQLite and PostgreSQL stores (a throwaway local
                                                         PostgreSQL when installed; pip install "psycopg[binary]")
    python -m bench.gguf_check --llama-server PATH     convert.py to-gguf's file in llama.cpp: the chat
                                                         template, tokenization and greedy ids against ours
    python -m bench.lm_eval_check [--ckpt DIR]           lm-evaluation-harness's loglikelihood path through
                                                         serve.py vs scoring the choices in-process
                                                         (pip install "lm-eval[api]")
    python -m bench.kernels [--only attention|ce] [--sweep]
                                                         fused_kernels vs PyTorch on a CUDA GPU
    python -m bench.kernels --cpu-loss                   the CPU loss path, plain vs fused
    python -m bench.kernels --compile-check              kernels' sm_90 resource use (no GPU needed)

These were formerly bench_pretrain.py, bench_ppo.py, bench_serve.py (top level),
`python -m data.bench` and `python -m fused_kernels.bench`.
"""
