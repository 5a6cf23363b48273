"""Write the regression corpus: each case below once crashed a reader, hung, allocated 1 TiB or
read other values without an error (README.md says which and how), and ``seed_digests.json``:
what the undamaged seed runs read back as (tests/hostile.py ``read_everything``). ``python tests/data/hostile/build.py`` rebuilds the files from
fresh seed runs of the tiny models; a rebuilt file may differ byte for byte from the committed
one (h5py versions lay files out differently), so the committed files are the corpus."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = [  # seed:kind:target:a:b, as tests.hostile.Mutation.describe() writes them
    "gpt2:json_garbage:meta/model:5:0",             # model info a float: AttributeError in inspect
    "gpt2:json_garbage:meta/model:6:0",             # model info {}: KeyError in inspect
    "t5:wrong_dtype:prompts/text_offsets:0:0",      # float offsets: TypeError slicing
    "gpt2:wrong_dtype:prompts/id_offsets:3:0",      # string offsets: ValueError int()
    "gpt2:delete:prompts/id_offsets:0:0",           # missing part: KeyError
    "gpt2:delete:acts/blocks.0.hook_resid_pre:0:0",
    "t5:delete:tokens/str:0:0",
    "t5:offsets_decrease:acts_offsets/decoder_blocks.0.self_attn.hook_pattern:2:1",  # reshape error
    "t5:offsets_huge:prompts/dec_tokens_offsets:1:7",  # reshape to (4, 1e12, 1e12)
    "gpt2:attr_huge_shape::0:0",                    # a hook of 2**40 heads: the reader looped for ever
    "t5:huge_shape:vocab/bytes:0:0",                # a 1 TiB dataset: tried to allocate it
    "gpt2:result_meta_garbage::0:0",                # a result whose meta is a list
    "gpt2:result_meta_garbage::0:1",                # ... whose analysis is a number
    "t5:result_meta_garbage::0:2",                  # ... whose meta is null
    "gpt2:attr_garbage:acts/blocks.0.hook_resid_post:2:4",  # an encoding attribute of 3 floats
    "gpt2:flip_meta::4:28",                         # metadata checksum failure: KeyError
    "t5:flip_meta::2:14",                           # metadata checksum failure: OSError on read
    "t5:zero_meta::6:42",                           # "bad object header version number"
    "t5:flip::4:28",                                # a gzip chunk that no longer inflates
    # These read without an error but read other values (found by the value check, 2,000 files):
    "gpt2:delete:tokens/loss:342608986:634291",     # read as a run without LM outputs
    "gpt2:delete:vocab/bytes:792971309:121335",     # tokens shown without their bytes
    "gpt2:huge_shape:prompts/text:910200491:794496",  # prompt texts read as zeros
    "t5:huge_shape:dec_tokens/str:141831164:164172",  # decoder token strings read as zeros
    "gpt2:offsets_decrease:prompts/text_offsets:707722891:624585",  # the last text cut short
    "gpt2:wrong_dtype:tokens/topk_logprobs:767492001:769773",  # log-probabilities truncated to ints
]


def build(cases: list[str], out: Path, models: dict | None = None) -> None:
    import workbench
    from tests import hostile as H
    from tests.test_hostile import make_seeds

    names = ("tiny-gpt2", "tiny-t5")
    models = models or {n: workbench.load_model(n, device="cpu", progress=False) for n in names}
    work = Path(tempfile.mkdtemp())
    try:
        seeds = make_seeds(work, models)
        digests = {name: H.read_everything(str(path)) for name, path in seeds.items()}
        (out / "seed_digests.json").write_text(json.dumps(digests, indent=1) + "\n")
        for case in cases:
            seed, kind, target, a, b = case.split(":")
            name = f"{seed}-{kind}-{target.replace('/', '_')}-{a}-{b}".rstrip("-")
            H.apply(H.Mutation(seed, kind, target, int(a), int(b)), seeds[seed], work / name)
            with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
                tar.add(work / name, arcname=name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    build(sys.argv[1:] or CASES, HERE)
