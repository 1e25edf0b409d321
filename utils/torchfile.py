"""What kind of file torch.load is about to read, told from its bytes without unpickling anything."""
import pickle
import zipfile

ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy (pre-1.6) format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def torch_format(path) -> str:
    """'zip' (torch.save since 1.6, TorchScript), 'truncated zip' (a zip whose end is missing: a copy or a
    write that did not finish), 'legacy' (torch < 1.6), 'empty', or 'other' (a plain pickle, text, ...)."""
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip" if zipfile.is_zipfile(path) else "truncated zip"
    return "legacy" if head == LEGACY_MAGIC else "other"
