"""MedGPT: turn a base language model into a medical assistant, end to end.

Run `medgpt --help` for the command list.

Layers, lowest first; a module imports only its own layer or lower ones, lazy imports inside functions included
(tests/test_layers.py checks every import):

    utils/config   utils.py, config.py, outdir.py       user errors, atomic writes, YAML + flags, output dirs
    args           args.py                              option groups shared by commands
    model          model/                               loading, adapters, merge, GGUF
    data           data/                                files -> records -> datasets, templates, cleaning
    train          train/                               run lifecycle, own trainers (PPO, ORPO/SimPO), rewards, losses
    scratch        scratch/                             tokenizer, vocabulary extension, packing, pretraining
    stages, infer  stages/, infer/                      one recipe per training command; the generation engine
    rag, eval      rag/, eval/                          knowledge base; evaluation and sample answers
    serve          serve/                               OpenAI API, web UI, vLLM
    pipeline, cli  pipeline.py, cli.py                  recipes of commands; the command table
"""

__version__ = "0.1.0"
