//! Reading a state dict saved by `torch.save` (the zip format PyTorch writes since 1.6) without
//! Python and without executing pickle code.
//!
//! Why not libtorch: tch's `Tensor::loadz_multi` goes through libtorch's TorchScript unpickler,
//! which turns the `collections.OrderedDict` every `module.state_dict()` is into `None` (it only
//! expects one as a tensor's empty backward hooks), so a real state dict fails to load.
//!
//! The archive holds `NAME/data.pkl` (a protocol-2 pickle of the dict) and one raw little-endian
//! file per storage (`NAME/data/KEY`). This module runs the small subset of the pickle machine
//! that `torch.save` emits for a dict of tensors, and recognises exactly three callables:
//! `collections.OrderedDict` (an empty dict), `torch._utils._rebuild_tensor_v2` and
//! `torch._utils._rebuild_parameter` (a tensor view of a storage). Anything else is refused by
//! name, so a hostile file cannot make it do more than fail.

use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

/// A value on the pickle machine's stack.
#[derive(Debug)]
enum Value {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global { module: String, name: String },
    Storage { kind: Kind, key: String },
    Tensor(Tensor),
}

impl Value {
    /// Memo entries are copied on `GET`; tensors share storage, everything else is small.
    fn duplicate(&self) -> Value {
        match self {
            Value::Mark => Value::Mark,
            Value::None => Value::None,
            Value::Bool(b) => Value::Bool(*b),
            Value::Int(i) => Value::Int(*i),
            Value::Float(f) => Value::Float(*f),
            Value::Str(s) => Value::Str(s.clone()),
            Value::Tuple(items) => Value::Tuple(items.iter().map(Value::duplicate).collect()),
            Value::List(items) => Value::List(items.iter().map(Value::duplicate).collect()),
            Value::Dict(items) => Value::Dict(
                items
                    .iter()
                    .map(|(k, v)| (k.duplicate(), v.duplicate()))
                    .collect(),
            ),
            Value::Global { module, name } => Value::Global {
                module: module.clone(),
                name: name.clone(),
            },
            Value::Storage { kind, key } => Value::Storage {
                kind: *kind,
                key: key.clone(),
            },
            Value::Tensor(t) => Value::Tensor(t.shallow_clone()),
        }
    }

    fn int(&self) -> Result<i64> {
        match self {
            Value::Int(i) => Ok(*i),
            other => bail!("expected an integer, found {other:?}"),
        }
    }

    fn ints(&self) -> Result<Vec<i64>> {
        match self {
            Value::Tuple(items) | Value::List(items) => items.iter().map(Value::int).collect(),
            other => bail!("expected a tuple of integers, found {other:?}"),
        }
    }
}

fn storage_kind(class: &str) -> Result<Kind> {
    Ok(match class {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => bail!("unsupported storage type torch.{other}"),
    })
}

/// Reads every tensor of a `torch.save`d dict of tensors, on the CPU, with its stored dtype.
/// Entries that are not tensors (a `_metadata` attribute, plain numbers) are skipped.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut archive = zip::ZipArchive::new(file).with_context(|| {
        format!(
            "{} is not a zip archive (torch.save writes one since PyTorch 1.6; a legacy file can be \
             re-saved with torch.save(torch.load(path), path))",
            path.display()
        )
    })?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let pickle_name = names
        .into_iter()
        .find(|name| name.ends_with("data.pkl") && name.matches('/').count() == 1)
        .with_context(|| format!("{} has no data.pkl", path.display()))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut pickle = Vec::new();
    archive
        .by_name(&pickle_name)?
        .read_to_end(&mut pickle)
        .with_context(|| format!("reading {pickle_name} in {}", path.display()))?;
    let mut storages = HashMap::new();
    let mut load_storage = |key: &str, kind: Kind| -> Result<Tensor> {
        if let Some(tensor) = storages.get(key) {
            return Ok(Tensor::shallow_clone(tensor));
        }
        let mut bytes = Vec::new();
        archive
            .by_name(&format!("{prefix}data/{key}"))
            .with_context(|| format!("storage {key} is missing"))?
            .read_to_end(&mut bytes)?;
        let element = kind.elt_size_in_bytes();
        ensure!(
            bytes.len() % element == 0,
            "storage {key} has {} bytes, not a whole number of {kind:?} elements",
            bytes.len()
        );
        let count = (bytes.len() / element) as i64;
        let tensor = Tensor::f_from_data_size(&bytes, &[count], kind)?;
        storages.insert(key.to_string(), tensor.shallow_clone());
        Ok(tensor)
    };
    let value = unpickle(&pickle, &mut load_storage)
        .with_context(|| format!("reading the state dict in {}", path.display()))?;
    let Value::Dict(items) = value else {
        bail!(
            "{} holds a {value:?}, not a dict of tensors",
            path.display()
        );
    };
    Ok(items
        .into_iter()
        .filter_map(|(key, value)| match (key, value) {
            (Value::Str(name), Value::Tensor(tensor)) => Some((name, tensor)),
            _ => None,
        })
        .collect())
}

/// Runs the pickle machine over `data`; `load_storage(key, kind)` provides storage contents.
fn unpickle(
    data: &[u8],
    load_storage: &mut dyn FnMut(&str, Kind) -> Result<Tensor>,
) -> Result<Value> {
    let mut reader = Reader { data, position: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    loop {
        let opcode = reader.byte()?;
        match opcode {
            0x80 => {
                reader.byte()?; // PROTO
            }
            0x95 => {
                reader.take(8)?; // FRAME
            }
            b'.' => return stack.pop().context("empty stack at STOP"), // STOP
            b'(' => stack.push(Value::Mark),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(reader.byte()? as i64)),
            b'M' => stack.push(Value::Int(u16::from_le_bytes(reader.array()?) as i64)),
            b'J' => stack.push(Value::Int(i32::from_le_bytes(reader.array()?) as i64)),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = reader.byte()? as usize;
                ensure!(n <= 8, "integer of {n} bytes is too large");
                let bytes = reader.take(n)?;
                let mut value: i64 = 0;
                for (i, b) in bytes.iter().enumerate() {
                    value |= (*b as i64) << (8 * i);
                }
                if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                    value -= 1 << (8 * n);
                }
                stack.push(Value::Int(value));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(reader.array()?))),
            b'X' => {
                let len = u32::from_le_bytes(reader.array()?) as usize;
                stack.push(Value::Str(reader.utf8(len)?));
            }
            0x8c => {
                let len = reader.byte()? as usize;
                stack.push(Value::Str(reader.utf8(len)?));
            }
            b'c' => {
                let module = reader.line()?;
                let name = reader.line()?;
                stack.push(Value::Global { module, name });
            }
            b'q' => {
                let index = reader.byte()? as u32;
                memo.insert(index, top(&stack)?.duplicate());
            }
            b'r' => {
                let index = u32::from_le_bytes(reader.array()?);
                memo.insert(index, top(&stack)?.duplicate());
            }
            0x94 => {
                let index = memo.len() as u32; // MEMOIZE
                memo.insert(index, top(&stack)?.duplicate());
            }
            b'h' | b'j' => {
                let index = if opcode == b'h' {
                    reader.byte()? as u32
                } else {
                    u32::from_le_bytes(reader.array()?)
                };
                let value = memo
                    .get(&index)
                    .with_context(|| format!("memo entry {index} is missing"))?;
                stack.push(value.duplicate());
            }
            b't' => {
                let items = pop_to_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let count = (opcode - 0x84) as usize;
                ensure!(stack.len() >= count, "stack underflow in TUPLE{count}");
                let items = stack.split_off(stack.len() - count);
                stack.push(Value::Tuple(items));
            }
            b'a' => {
                let item = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(items)) => items.push(item),
                    _ => bail!("APPEND to a non-list"),
                }
            }
            b'e' => {
                let new = pop_to_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(items)) => items.extend(new),
                    _ => bail!("APPENDS to a non-list"),
                }
            }
            b's' | b'u' => {
                let flat = if opcode == b's' {
                    let value = pop(&mut stack)?;
                    let key = pop(&mut stack)?;
                    vec![key, value]
                } else {
                    pop_to_mark(&mut stack)?
                };
                ensure!(flat.len() % 2 == 0, "SETITEMS with an odd number of values");
                let Some(Value::Dict(items)) = stack.last_mut() else {
                    bail!("SETITEM(S) on a non-dict");
                };
                let mut flat = flat.into_iter();
                while let (Some(key), Some(value)) = (flat.next(), flat.next()) {
                    items.push((key, value));
                }
            }
            b'b' => {
                // BUILD: the object's attributes (a state dict's `_metadata`) are not needed.
                pop(&mut stack)?;
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent_storage(pid)?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(reduce(callable, args, load_storage)?);
            }
            other => bail!(
                "unsupported pickle opcode 0x{other:02x} at byte {}",
                reader.position - 1
            ),
        }
    }
}

/// `('storage', torch.XStorage, key, location, numel)` -> a storage reference.
fn persistent_storage(pid: Value) -> Result<Value> {
    let Value::Tuple(items) = pid else {
        bail!("unsupported persistent id {pid:?}");
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global { module, name }, Value::Str(key), _location, _numel]
            if tag == "storage" && module == "torch" =>
        {
            Ok(Value::Storage {
                kind: storage_kind(name)?,
                key: key.clone(),
            })
        }
        _ => bail!("unsupported persistent id {items:?}"),
    }
}

fn reduce(
    callable: Value,
    args: Value,
    load_storage: &mut dyn FnMut(&str, Kind) -> Result<Tensor>,
) -> Result<Value> {
    let Value::Global { module, name } = callable else {
        bail!("REDUCE of a non-global {callable:?}");
    };
    let Value::Tuple(mut args) = args else {
        bail!("REDUCE with non-tuple arguments {args:?}");
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") => {
            ensure!(
                args.len() >= 4,
                "_rebuild_tensor_v2 takes at least 4 arguments"
            );
            let Value::Storage { kind, key } = &args[0] else {
                bail!("_rebuild_tensor_v2 of a non-storage {:?}", args[0]);
            };
            let offset = args[1].int()?;
            let size = args[2].ints()?;
            let stride = args[3].ints()?;
            let storage = load_storage(key, *kind)?;
            let tensor = storage
                .f_as_strided(size.as_slice(), stride.as_slice(), offset)
                .with_context(|| format!("tensor view {size:?} of storage {key}"))?;
            Ok(Value::Tensor(tensor.contiguous()))
        }
        ("torch._utils", "_rebuild_parameter") => {
            ensure!(!args.is_empty(), "_rebuild_parameter without arguments");
            match args.swap_remove(0) {
                tensor @ Value::Tensor(_) => Ok(tensor),
                other => bail!("_rebuild_parameter of a non-tensor {other:?}"),
            }
        }
        _ => bail!("refusing to call {module}.{name}: not part of a plain state dict"),
    }
}

fn top(stack: &[Value]) -> Result<&Value> {
    stack.last().context("empty pickle stack")
}

fn pop(stack: &mut Vec<Value>) -> Result<Value> {
    stack.pop().context("pickle stack underflow")
}

fn pop_to_mark(stack: &mut Vec<Value>) -> Result<Vec<Value>> {
    let mark = stack
        .iter()
        .rposition(|value| matches!(value, Value::Mark))
        .context("no MARK on the pickle stack")?;
    let items = stack.split_off(mark + 1);
    stack.pop();
    Ok(items)
}

struct Reader<'a> {
    data: &'a [u8],
    position: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .position
            .checked_add(n)
            .filter(|end| *end <= self.data.len())
            .context("truncated pickle")?;
        let bytes = &self.data[self.position..end];
        self.position = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn utf8(&mut self, len: usize) -> Result<String> {
        String::from_utf8(self.take(len)?.to_vec()).context("string is not UTF-8")
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.position..];
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .context("unterminated GLOBAL")?;
        let line = String::from_utf8(rest[..end].to_vec()).context("GLOBAL is not UTF-8")?;
        self.position += end + 1;
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_storage(_: &str, _: Kind) -> Result<Tensor> {
        bail!("no storage expected")
    }

    #[test]
    fn refuses_unknown_callables() {
        // GLOBAL os.system, EMPTY_TUPLE, REDUCE, STOP.
        let pickle = b"\x80\x02cos\nsystem\n)R.";
        let error = unpickle(pickle, &mut no_storage).unwrap_err();
        assert!(
            format!("{error}").contains("refusing to call os.system"),
            "{error}"
        );
    }

    #[test]
    fn reads_plain_values_and_rejects_truncation() {
        // A dict {'a': (1, -2, 300)}: EMPTY_DICT MARK 'a' MARK 1 -2 300 TUPLE SETITEMS STOP.
        let mut pickle =
            b"\x80\x02}(X\x01\x00\x00\x00a(K\x01J\xfe\xff\xff\xffM\x2c\x01tu.".to_vec();
        let Value::Dict(items) = unpickle(&pickle, &mut no_storage).unwrap() else {
            panic!("not a dict")
        };
        assert_eq!(items[0].1.ints().unwrap(), vec![1, -2, 300]);
        pickle.truncate(pickle.len() - 3);
        assert!(unpickle(&pickle, &mut no_storage).is_err());
    }
}
