"""Arrow arrays made from NumPy buffers, for the metrics files and the checkpoints.

pa.array would do the same, but its first call in a process imports pandas (0.3-0.4 s, paid by
every run); pa.Array.from_buffers and the list and string constructors here do not.
"""

import numpy as np
import pyarrow as pa


def array(data, valid=None):
    """The Arrow array of a 1-D NumPy array; null where valid (bools) is False."""
    data = np.ascontiguousarray(data)
    nulls = 0 if valid is None else len(valid) - int(np.count_nonzero(valid))
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.from_numpy_dtype(data.dtype), len(data), [bitmap, pa.py_buffer(data)],
                                 null_count=nulls)


def strings(texts):
    """A string array of texts."""
    blobs = [text.encode() for text in texts]
    offsets = np.cumsum([0, *map(len, blobs)], dtype=np.int32)
    return pa.StringArray.from_buffers(len(blobs), pa.py_buffer(offsets), pa.py_buffer(b"".join(blobs)))


def lists(parts, dtype):
    """A list array of 1-D NumPy arrays of dtype."""
    offsets = np.cumsum([0, *map(len, parts)], dtype=np.int32)
    return pa.ListArray.from_arrays(array(offsets), array(np.concatenate([np.empty(0, dtype), *parts])))
