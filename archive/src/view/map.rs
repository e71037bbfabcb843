//! The view's index of what the packs after the base wrote: non-overlapping runs of
//! the volume, each naming where its newest bytes are (an offset in one pack's body,
//! or zeros). Built oldest write first, so a later write replaces what it covers.
//! Pure; memory is one entry per surviving run, whatever the volume's size.
use std::collections::BTreeMap;

/// Where a run's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    /// In pack number `pack` of the view, from offset `at` of its uncompressed body.
    Pack { pack: u32, at: u64 },
    /// Trimmed or zeroed: reads as zeros, nothing stored.
    Zero,
}

impl Src {
    /// The source of the same run `delta` bytes further in.
    fn shift(self, delta: u64) -> Src {
        match self {
            Src::Pack { pack, at } => Src::Pack {
                pack,
                at: at + delta,
            },
            Src::Zero => Src::Zero,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    end: u64,
    src: Src,
}

#[derive(Debug, Default)]
pub struct RunMap {
    runs: BTreeMap<u64, Run>,
}

impl RunMap {
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// `[start, end)` now reads from `src`, replacing whatever covered it.
    pub fn insert(&mut self, start: u64, end: u64, src: Src) {
        if start >= end {
            return;
        }
        // A run from before `start` keeps its head, and its tail if it reaches past `end`.
        if let Some((&s, &r)) = self.runs.range(..start).next_back() {
            if r.end > start {
                self.runs.insert(
                    s,
                    Run {
                        end: start,
                        src: r.src,
                    },
                );
                if r.end > end {
                    let tail = Run {
                        end: r.end,
                        src: r.src.shift(end - s),
                    };
                    self.runs.insert(end, tail);
                }
            }
        }
        let inside: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some(r) = self.runs.remove(&s) {
                if r.end > end {
                    let tail = Run {
                        end: r.end,
                        src: r.src.shift(end - s),
                    };
                    self.runs.insert(end, tail);
                }
            }
        }
        self.runs.insert(start, Run { end, src });
    }

    /// The runs overlapping `[from, to)`, clipped to it, in order: `(start, end, src)`.
    pub fn runs(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, u64, Src)> + '_ {
        let first = self
            .runs
            .range(..from)
            .next_back()
            .filter(|(_, r)| r.end > from);
        first
            .into_iter()
            .chain(self.runs.range(from..to))
            .map(move |(&s, r)| {
                let cs = s.max(from);
                (cs, r.end.min(to), r.src.shift(cs - s))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Per byte: what the naive model says it reads from.
    fn model(ops: &[(u64, u64, Option<u64>)], size: u64) -> Vec<Option<Src>> {
        let mut m = vec![None; size as usize];
        for (i, &(s, e, at)) in ops.iter().enumerate() {
            for b in s..e {
                m[b as usize] = Some(match at {
                    Some(at) => Src::Pack {
                        pack: i as u32,
                        at: at + (b - s),
                    },
                    None => Src::Zero,
                });
            }
        }
        m
    }

    proptest! {
        #[test]
        fn runs_match_a_byte_model(
            ops in prop::collection::vec((0u64..64, 1u64..24, prop::option::of(0u64..1000)), 1..24),
            from in 0u64..64, span in 1u64..80,
        ) {
            const SIZE: u64 = 96;
            let ops: Vec<_> = ops.into_iter().map(|(s, l, at)| (s, (s + l).min(SIZE), at)).collect();
            let mut map = RunMap::default();
            for (i, &(s, e, at)) in ops.iter().enumerate() {
                let src = at.map_or(Src::Zero, |at| Src::Pack { pack: i as u32, at });
                map.insert(s, e, src);
            }
            let want = model(&ops, SIZE);
            let to = (from + span).min(SIZE);
            let mut got = vec![None; SIZE as usize];
            let mut prev = from;
            for (s, e, src) in map.runs(from, to) {
                prop_assert!(s >= prev && s < e && e <= to, "run {s}..{e} out of order or range");
                prev = e;
                for b in s..e {
                    got[b as usize] = Some(src.shift(b - s));
                }
            }
            for b in from..to {
                prop_assert_eq!(got[b as usize], want[b as usize], "byte {}", b);
            }
        }
    }
}
