//! Compact ordered containers keyed by message sequence number.
//!
//! A subscription's backlog is mostly a run of nearly consecutive seqs (seqs
//! are global, so other topics' publishes and filters leave gaps). A
//! `BTreeMap<u64, V>` pays a key and ~40 % of empty node space per entry;
//! these group 64 consecutive seqs under one key with a presence bitmap, so a
//! dense run costs `size_of::<V>()` per entry plus ~1 byte, and a lone seq
//! no more than a B-tree entry.

use std::collections::BTreeMap;

const SHIFT: u32 = 6;
const MASK: u64 = (1 << SHIFT) - 1;

fn split(seq: u64) -> (u64, u32) {
    (seq >> SHIFT, (seq & MASK) as u32)
}

/// Rank of `bit` among the set bits of `bits` (how many are below it).
fn rank(bits: u64, bit: u32) -> usize {
    (bits & ((1u64 << bit) - 1)).count_ones() as usize
}

/// Seqs grouped by 64-seq block, `B` per block: a bare presence bitmap
/// ([`SeqSet`]) or a bitmap with the present seqs' values ([`SeqMap`]).
/// What only needs the bitmaps is written once, here.
#[derive(Debug)]
pub(crate) struct Blocks<B> {
    blocks: BTreeMap<u64, B>,
    len: usize,
}

/// An ordered set of seqs: one `u64` bitmap per 64-seq block.
pub(crate) type SeqSet = Blocks<u64>;

/// An ordered map from seq to `V`: per 64-seq block, a presence bitmap and
/// the values of the present seqs in order.
pub(crate) type SeqMap<V> = Blocks<Block<V>>;

/// A block's presence bitmap: bit `i` set when seq `block * 64 + i` is in.
pub(crate) trait Presence {
    fn bits(&self) -> u64;
}

impl Presence for u64 {
    fn bits(&self) -> u64 {
        *self
    }
}

impl<V> Presence for Block<V> {
    fn bits(&self) -> u64 {
        self.bits
    }
}

impl<B> Default for Blocks<B> {
    fn default() -> Self {
        Blocks {
            blocks: BTreeMap::new(),
            len: 0,
        }
    }
}

#[allow(dead_code)] // the full API; tests use all of it
impl<B: Presence> Blocks<B> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains_key(&self, seq: &u64) -> bool {
        let (b, bit) = split(*seq);
        self.blocks
            .get(&b)
            .is_some_and(|block| block.bits() & (1 << bit) != 0)
    }

    /// The lowest seq present.
    pub fn first_key(&self) -> Option<u64> {
        let (&b, block) = self.blocks.first_key_value()?;
        Some((b << SHIFT) | block.bits().trailing_zeros() as u64)
    }

    /// The seqs present, in order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks
            .iter()
            .flat_map(|(&b, block)| BitIter(block.bits()).map(move |bit| (b << SHIFT) | bit as u64))
    }
}

#[allow(dead_code)] // the full set API; tests use all of it
impl SeqSet {
    /// Returns true when `seq` was not in the set.
    pub fn insert(&mut self, seq: u64) -> bool {
        let (b, bit) = split(seq);
        let bits = self.blocks.entry(b).or_insert(0);
        let new = *bits & (1 << bit) == 0;
        *bits |= 1 << bit;
        self.len += new as usize;
        new
    }

    /// Returns true when `seq` was in the set.
    pub fn remove(&mut self, seq: &u64) -> bool {
        let (b, bit) = split(*seq);
        let Some(bits) = self.blocks.get_mut(&b) else {
            return false;
        };
        let had = *bits & (1 << bit) != 0;
        *bits &= !(1 << bit);
        if *bits == 0 {
            self.blocks.remove(&b);
        }
        self.len -= had as usize;
        had
    }
}

struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(bit)
    }
}

pub(crate) struct Block<V> {
    bits: u64,
    /// One value per set bit, in bit order.
    items: Vec<V>,
}

#[allow(dead_code)] // the full map API; tests use all of it
impl<V> SeqMap<V> {
    pub fn get(&self, seq: &u64) -> Option<&V> {
        let (b, bit) = split(*seq);
        let block = self.blocks.get(&b)?;
        (block.bits & (1 << bit) != 0).then(|| &block.items[rank(block.bits, bit)])
    }

    pub fn get_mut(&mut self, seq: &u64) -> Option<&mut V> {
        let (b, bit) = split(*seq);
        let block = self.blocks.get_mut(&b)?;
        if block.bits & (1 << bit) == 0 {
            return None;
        }
        Some(&mut block.items[rank(block.bits, bit)])
    }

    /// Inserts or replaces; returns the old value.
    pub fn insert(&mut self, seq: u64, v: V) -> Option<V> {
        let (b, bit) = split(seq);
        let block = self.blocks.entry(b).or_insert_with(|| Block {
            bits: 0,
            items: Vec::new(),
        });
        let r = rank(block.bits, bit);
        if block.bits & (1 << bit) != 0 {
            return Some(std::mem::replace(&mut block.items[r], v));
        }
        block.bits |= 1 << bit;
        block.items.insert(r, v);
        self.len += 1;
        None
    }

    pub fn remove(&mut self, seq: &u64) -> Option<V> {
        let (b, bit) = split(*seq);
        let block = self.blocks.get_mut(&b)?;
        if block.bits & (1 << bit) == 0 {
            return None;
        }
        let v = block.items.remove(rank(block.bits, bit));
        block.bits &= !(1 << bit);
        self.len -= 1;
        if block.bits == 0 {
            self.blocks.remove(&b);
        } else if block.items.capacity() >= 4 * block.items.len().max(4) {
            block.items.shrink_to_fit();
        }
        Some(v)
    }

    /// `(seq, value)` in seq order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.blocks.iter().flat_map(|(&b, block)| {
            BitIter(block.bits)
                .zip(block.items.iter())
                .map(move |(bit, v)| ((b << SHIFT) | bit as u64, v))
        })
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.blocks.values().flat_map(|b| b.items.iter())
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> + '_ {
        self.blocks.values_mut().flat_map(|b| b.items.iter_mut())
    }
}

impl<V> std::ops::Index<&u64> for SeqMap<V> {
    type Output = V;
    fn index(&self, seq: &u64) -> &V {
        self.get(seq).expect("seq in SeqMap")
    }
}

/// A seeded xorshift generator for randomised tests: `next(n)` is in `0..n`.
#[cfg(test)]
pub(crate) fn test_rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut rng = seed;
    move |n| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn behaves_like_btree() {
        let mut next = test_rng(0x9E3779B97F4A7C15);
        let mut m = SeqMap::new();
        let mut bm = BTreeMap::new();
        let mut s = SeqSet::new();
        let mut bs = BTreeSet::new();
        for i in 0..20_000u64 {
            let k = if i % 3 == 0 {
                next(1000)
            } else {
                next(300) * 7
            };
            match next(3) {
                0 | 1 => {
                    assert_eq!(m.insert(k, i), bm.insert(k, i));
                    assert_eq!(s.insert(k), bs.insert(k));
                }
                _ => {
                    assert_eq!(m.remove(&k), bm.remove(&k));
                    assert_eq!(s.remove(&k), bs.remove(&k));
                }
            }
            assert_eq!(m.len(), bm.len());
            assert_eq!(s.len(), bs.len());
            assert_eq!(m.first_key(), bm.keys().next().copied());
            assert_eq!(s.first_key(), bs.first().copied());
            assert_eq!(m.get(&k), bm.get(&k));
            assert_eq!(s.contains_key(&k), bs.contains(&k));
            if i % 1000 == 0 {
                assert!(m
                    .iter()
                    .map(|(k, v)| (k, *v))
                    .eq(bm.iter().map(|(k, v)| (*k, *v))));
                assert!(s.keys().eq(bs.iter().copied()));
                assert!(m.values().eq(bm.values()));
            }
        }
    }
}
