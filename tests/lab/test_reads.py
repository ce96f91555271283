"""The read counter: each tensor ``telelora.reference`` reads, by folder, and nothing patched after."""

from telelora import reference
from telelora.lab.reads import counting_reads


def test_counting_reads_counts_each_tensor_read_and_puts_safe_open_back(tiny_models):
    model_dir = tiny_models["llama"]
    names = list(reference.floating_shapes(model_dir))
    real_open = reference.safe_open
    with counting_reads() as reads, reference.open_references([model_dir]) as tensor:
        size = sum(tensor(n).numel() * 4 for n in names)  # float32 checkpoint
    assert reads.tensors == {model_dir: len(names)} and reads.bytes == {model_dir: size}
    assert reference.safe_open is real_open
