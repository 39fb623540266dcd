//! The body both shard targets share: the first byte picks the sample count, labeled and policy; the
//! rest is the shard in `format`.
use butler_data::manifest::{Manifest, ShardEntry, ShardFormat};
use butler_data::shard::{parse_shard, CorruptPolicy};
use std::path::Path;

pub fn run(data: &[u8], format: ShardFormat, path: &str, shape: Vec<usize>) {
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let entry = ShardEntry {
        path: path.into(),
        format,
        num_samples: (ctl & 0x0f) as u64,
        sha256: String::new(),
        first_id: 100,
    };
    let numel: usize = shape.iter().product();
    let m = Manifest::single_shard(shape, 3, entry.clone(), true);
    let policy = if ctl & 0x20 == 0 {
        CorruptPolicy::Fail
    } else {
        CorruptPolicy::Skip
    };
    if let Ok((d, skipped)) =
        parse_shard(Path::new("s"), bytes, &m, &entry, ctl & 0x10 != 0, policy)
    {
        assert_eq!(d.x.len(), d.ids.len() * numel);
        assert_eq!(d.ids.len() + skipped.len(), entry.num_samples as usize);
    }
}
