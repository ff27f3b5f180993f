"""Read PyTorch state-dict checkpoints into NumPy arrays without importing torch.

Two on-disk formats are supported:

* zip format (torch >= 1.6 default): ``<root>/data.pkl`` contains the object
  pickle, and each storage is stored in ``<root>/data/<key>`` as raw bytes.
* legacy format (``_use_new_zipfile_serialization=False``): a sequence of
  pickles (magic number, protocol version, system info, the object pickle,
  the list of storage keys), followed by each storage's raw bytes, each
  preceded by an 8-byte little-endian element count.

Only what a plain state dict of dense CPU tensors needs is implemented:
``torch._utils._rebuild_tensor_v2``, typed storages and ``OrderedDict``.
"""

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

# Storage class name (as pickled by torch) -> NumPy dtype of one element.
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

class _StorageType:
    """Stand-in for a torch storage class; only its element dtype matters."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _TensorRef:
    """Tensor recorded during unpickling and materialised once storages are filled.

    Legacy checkpoints store the raw bytes after the object pickle, so a view
    cannot be copied out at the time ``_rebuild_tensor_v2`` runs.
    """

    def __init__(self, storage, storage_offset, size, stride):
        self.storage = storage
        self.storage_offset = storage_offset
        self.size = tuple(size)
        self.stride = tuple(stride)

    def to_numpy(self):
        itemsize = self.storage.dtype.itemsize
        if len(self.size) == 0:
            return np.array(self.storage[self.storage_offset])
        view = np.lib.stride_tricks.as_strided(
            self.storage[self.storage_offset:], shape=self.size,
            strides=tuple(s * itemsize for s in self.stride))
        return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``."""
    return _TensorRef(storage, storage_offset, size, stride)


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that maps the torch globals of a state dict onto NumPy stand-ins.

    ``load_storage(key, dtype, numel)`` must return a 1-D NumPy array for the
    persistent id of a storage.
    """

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage
        self._storages = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(
            f"unsupported global {module}.{name} in checkpoint; only plain state dicts "
            "of dense tensors can be read without torch")

    def persistent_load(self, pid):
        # pid = ("storage", storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, storage_type.dtype, numel)
        return self._storages[key]


def _load_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickle_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickle_names) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the zip, found {pickle_names}")
        root = pickle_names[0][: -len("data.pkl")]
        byteorder_name = root + "byteorder"
        if byteorder_name in names and archive.read(byteorder_name).strip() != b"little":
            raise ValueError(f"{path}: only little-endian checkpoints are supported")

        def load_storage(key, dtype, numel):
            raw = archive.read(f"{root}data/{key}")
            array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
            if array.size != numel:
                raise ValueError(f"{path}: storage {key} has {array.size} elements, "
                                 f"pickle expects {numel}")
            return array

        with archive.open(pickle_names[0]) as handle:
            return _StateDictUnpickler(io.BytesIO(handle.read()), load_storage).load()


def _load_legacy(path):
    with open(path, "rb") as handle:
        data = handle.read()
    stream = io.BytesIO(data)

    magic = pickle.load(stream)
    if magic != LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{path}: invalid legacy torch magic number {magic!r}")
    protocol_version = pickle.load(stream)
    if protocol_version != 1001:
        raise ValueError(f"{path}: unsupported legacy protocol version {protocol_version}")
    sys_info = pickle.load(stream)
    if not sys_info.get("little_endian", False):
        raise ValueError(f"{path}: only little-endian checkpoints are supported")

    # The object pickle refers to storages by key. Their bytes come after the
    # key list, so record the requests first and fill the arrays in afterwards.
    requested = {}

    def load_storage(key, dtype, numel):
        buffer = np.empty(numel, dtype=dtype)
        requested[key] = buffer
        return buffer

    state = _StateDictUnpickler(stream, load_storage).load()
    storage_keys = pickle.load(stream)

    offset = stream.tell()
    for key in storage_keys:
        (numel,) = struct.unpack_from("<q", data, offset)
        offset += 8
        buffer = requested[key]
        if numel != buffer.size:
            raise ValueError(f"{path}: storage {key} has {numel} elements, "
                             f"pickle expects {buffer.size}")
        nbytes = numel * buffer.dtype.itemsize
        buffer[...] = np.frombuffer(data, dtype=buffer.dtype.newbyteorder("<"),
                                    count=numel, offset=offset)
        offset += nbytes
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} trailing bytes after the last storage")
    return state


def load_state_dict(path):
    """Load a torch state dict as an ``OrderedDict`` of name -> NumPy array.

    Every array is a copy, so tensors that shared a storage no longer alias.
    """
    path = str(path)
    if zipfile.is_zipfile(path):
        state = _load_zip(path)
    else:
        state = _load_legacy(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    arrays = collections.OrderedDict()
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise ValueError(f"{path}: entry {name} is {type(value).__name__}, not a tensor")
        arrays[name] = value.to_numpy()
    return arrays
