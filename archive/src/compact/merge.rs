//! Merging consecutive write-sets into one: what every byte range holds after all of
//! them (the latest record wins), so the points between them are gone and so is the
//! data only those points could see. Pure, and bounded by what it holds
//! ([`Merger::bytes`]): the caller emits before it grows past its limit.
use std::collections::BTreeMap;

use bytes::Bytes;

use crate::format::pack::{Op, Record, WriteSet};

/// What a merged range holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fill {
    Data(Bytes),
    Trim,
    Zero,
}

#[derive(Debug, Clone)]
struct Piece {
    end: u64,
    /// The sequence of the record it comes from (kept, so a merged record still sits
    /// at or before its write-set's end).
    seq: u64,
    fill: Fill,
}

/// Write-sets merged so far: per volume, non-overlapping pieces by offset.
#[derive(Debug, Default)]
pub struct Merger {
    vols: BTreeMap<u32, BTreeMap<u64, Piece>>,
    /// Payload bytes held (copies: the input packs' bodies are not kept alive).
    bytes: usize,
    /// The last write-set added: its end, time and seals (its own bookmark stays
    /// with it when it is emitted).
    last: Option<(u64, u64, Vec<Record>)>,
}

impl Merger {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    /// Adds `ws` after everything added before. Seals of earlier write-sets are
    /// dropped (their points are gone); `ws`'s own are kept until the next add.
    pub fn add(&mut self, ws: &WriteSet) {
        let mut seals = Vec::new();
        for r in &ws.records {
            let fill = match &r.op {
                Op::Write(b) => Fill::Data(Bytes::copy_from_slice(b)),
                Op::Trim => Fill::Trim,
                Op::Zero => Fill::Zero,
                Op::Seal(_) => {
                    seals.push(r.clone());
                    continue;
                }
            };
            let end = r.offset.saturating_add(r.len as u64);
            if end > r.offset {
                self.insert(r.volume, r.offset, end, r.seq, fill);
            }
        }
        self.last = Some((ws.end_seq, ws.timestamp_ns, seals));
    }

    /// Writes `[start, end)` over whatever was there.
    fn insert(&mut self, volume: u32, start: u64, end: u64, seq: u64, fill: Fill) {
        let pieces = self.vols.entry(volume).or_default();
        let over: Vec<u64> = pieces
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > start)
            .map(|(&s, _)| s)
            .collect();
        for s in over {
            let Some(p) = pieces.remove(&s) else { continue };
            self.bytes -= data_len(&p.fill);
            if s < start {
                let left = cut(&p.fill, 0, (start - s) as usize);
                self.bytes += data_len(&left);
                pieces.insert(
                    s,
                    Piece {
                        end: start,
                        seq: p.seq,
                        fill: left,
                    },
                );
            }
            if p.end > end {
                let right = cut(&p.fill, (end - s) as usize, (p.end - s) as usize);
                self.bytes += data_len(&right);
                pieces.insert(
                    end,
                    Piece {
                        end: p.end,
                        seq: p.seq,
                        fill: right,
                    },
                );
            }
        }
        self.bytes += data_len(&fill);
        pieces.insert(start, Piece { end, seq, fill });
    }

    /// The merged write-set, ending where the last one added ends; the merger is
    /// empty afterwards. `None` when nothing was added.
    pub fn emit(&mut self) -> Option<WriteSet> {
        let (end_seq, timestamp_ns, seals) = self.last.take()?;
        let mut records: Vec<Record> = std::mem::take(&mut self.vols)
            .into_iter()
            .flat_map(|(volume, pieces)| {
                pieces.into_iter().map(move |(offset, p)| Record {
                    seq: p.seq,
                    volume,
                    offset,
                    len: (p.end - offset) as u32,
                    op: match p.fill {
                        Fill::Data(b) => Op::Write(b),
                        Fill::Trim => Op::Trim,
                        Fill::Zero => Op::Zero,
                    },
                })
            })
            .chain(seals)
            .collect();
        records.sort_by_key(|r| (r.seq, r.volume, r.offset));
        self.bytes = 0;
        Some(WriteSet {
            end_seq,
            timestamp_ns,
            records,
        })
    }
}

fn data_len(f: &Fill) -> usize {
    match f {
        Fill::Data(b) => b.len(),
        Fill::Trim | Fill::Zero => 0,
    }
}

/// `[from, to)` of a piece's fill (relative to its start).
fn cut(f: &Fill, from: usize, to: usize) -> Fill {
    match f {
        Fill::Data(b) => Fill::Data(b.slice(from..to)),
        Fill::Trim => Fill::Trim,
        Fill::Zero => Fill::Zero,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Applies write-sets to an image (what restore does).
    fn apply(img: &mut [u8], sets: &[WriteSet]) {
        for ws in sets {
            for r in &ws.records {
                let (o, n) = (r.offset as usize, r.len as usize);
                match &r.op {
                    Op::Write(b) => img[o..o + n].copy_from_slice(b),
                    Op::Trim | Op::Zero => img[o..o + n].fill(0),
                    Op::Seal(_) => {}
                }
            }
        }
    }

    fn op() -> impl Strategy<Value = (u8, u64, u32, u8)> {
        (0u8..3, 0u64..4000, 1u32..600, any::<u8>())
    }

    proptest! {
        /// Any write-sets merged give the image applying them one by one gives, with
        /// non-overlapping records at or before the end, and only the last seals.
        #[test]
        fn merged_equals_applied(sets in proptest::collection::vec(proptest::collection::vec(op(), 0..6), 1..8)) {
            let mut seq = 0;
            let mut wss = Vec::new();
            for recs in &sets {
                let mut records = Vec::new();
                for &(kind, offset, len, byte) in recs {
                    seq += 1;
                    let len = len.min(4600 - offset as u32);
                    let op = match kind {
                        0 => Op::Write(Bytes::from(vec![byte | 1; len as usize])),
                        1 => Op::Trim,
                        _ => Op::Zero,
                    };
                    records.push(Record { seq, volume: 0, offset, len, op });
                }
                seq += 1;
                records.push(Record { seq, volume: 0, offset: 0, len: 2, op: Op::Seal(format!("s{seq}")) });
                wss.push(WriteSet { end_seq: seq, timestamp_ns: seq * 10, records });
            }
            let mut m = Merger::default();
            for ws in &wss {
                m.add(ws);
            }
            let merged = m.emit().unwrap();
            prop_assert!(m.is_empty() && m.bytes() == 0);
            let (mut want, mut got) = (vec![0xAAu8; 4600], vec![0xAAu8; 4600]);
            apply(&mut want, &wss);
            apply(&mut got, std::slice::from_ref(&merged));
            prop_assert!(want == got);
            prop_assert_eq!(merged.end_seq, seq);
            let seals: Vec<_> = merged.records.iter().filter(|r| matches!(r.op, Op::Seal(_))).collect();
            prop_assert_eq!(seals.len(), 1);
            prop_assert!(merged.records.iter().all(|r| r.seq <= merged.end_seq));
            let mut ranges: Vec<(u64, u64)> = merged.records.iter()
                .filter(|r| !matches!(r.op, Op::Seal(_)))
                .map(|r| (r.offset, r.offset + r.len as u64)).collect();
            ranges.sort();
            prop_assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "overlap: {:?}", ranges);
        }
    }

    #[test]
    fn an_overwrite_keeps_only_the_newest_bytes() {
        let w = |seq, offset, byte: u8, len: usize| Record {
            seq,
            volume: 0,
            offset,
            len: len as u32,
            op: Op::Write(Bytes::from(vec![byte; len])),
        };
        let mut m = Merger::default();
        for (i, r) in [w(1, 0, 1, 4096), w(2, 0, 2, 4096), w(3, 1024, 3, 1024)]
            .into_iter()
            .enumerate()
        {
            m.add(&WriteSet {
                end_seq: i as u64 + 1,
                timestamp_ns: 0,
                records: vec![r],
            });
        }
        assert_eq!(m.bytes(), 4096, "the first write is gone entirely");
        let ws = m.emit().unwrap();
        let spans: Vec<_> = ws
            .records
            .iter()
            .map(|r| (r.seq, r.offset, r.len))
            .collect();
        assert_eq!(spans, vec![(2, 0, 1024), (2, 2048, 2048), (3, 1024, 1024)]);
    }
}
