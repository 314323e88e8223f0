//! Cost arithmetic: how a machine's up-time is split among the runs it
//! executed, and what that costs at a price per hour. Pure, in milliseconds
//! of wall-clock time.

/// A half-open interval `[start_ms, end_ms)`; empty when `end_ms <= start_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Span {
    pub fn new(start_ms: i64, end_ms: i64) -> Self {
        Span { start_ms, end_ms }
    }
}

/// Splits one machine's up-time among the runs it executed: at each instant
/// the machine's time is shared equally among the runs executing on it then;
/// instants with no run are idle. Runs are clipped to the up spans.
///
/// Returns the seconds charged to each run (same order as `runs`) and the
/// idle seconds. Overlapping up spans are merged first, so the shares plus
/// idle add up to the length of their union (for disjoint spans: Σ up).
pub fn share_machine_time(up: &[Span], runs: &[Span]) -> (Vec<f64>, f64) {
    let up = merge(up);
    // Every instant where the integrand changes: up boundaries and run ends.
    let mut points: Vec<i64> = up
        .iter()
        .flat_map(|s| [s.start_ms, s.end_ms])
        .chain(
            runs.iter()
                .filter(|r| r.end_ms > r.start_ms)
                .flat_map(|r| [r.start_ms, r.end_ms]),
        )
        .collect();
    points.sort_unstable();
    points.dedup();

    // Active run count just after each point, by a difference array.
    let mut delta = vec![0i64; points.len()];
    for r in runs.iter().filter(|r| r.end_ms > r.start_ms) {
        delta[points.binary_search(&r.start_ms).unwrap()] += 1;
        delta[points.binary_search(&r.end_ms).unwrap()] -= 1;
    }

    // cum[i] = ∫ from points[0] to points[i] of up(t)/k(t) over instants
    // with k(t) > 0 — the time one run accrues if it runs throughout. A run's
    // share is then cum[end] − cum[start]: between its ends k ≥ 1 always.
    let mut cum = vec![0.0f64; points.len()];
    let mut idle_ms = 0.0f64;
    let mut active = 0i64;
    let mut u = 0usize; // first merged up span that may still cover
    for i in 0..points.len() {
        active += delta[i];
        let Some(&next) = points.get(i + 1) else {
            break;
        };
        let (a, b) = (points[i], next);
        while u < up.len() && up[u].end_ms <= a {
            u += 1;
        }
        // Elementary intervals never straddle an up boundary.
        let covered = u < up.len() && up[u].start_ms <= a;
        let len = (b - a) as f64;
        cum[i + 1] = cum[i];
        if covered {
            if active > 0 {
                cum[i + 1] += len / active as f64;
            } else {
                idle_ms += len;
            }
        }
    }

    let shares = runs
        .iter()
        .map(|r| {
            if r.end_ms <= r.start_ms {
                return 0.0;
            }
            let s = points.binary_search(&r.start_ms).unwrap();
            let e = points.binary_search(&r.end_ms).unwrap();
            (cum[e] - cum[s]) / 1000.0
        })
        .collect();
    (shares, idle_ms / 1000.0)
}

/// Sorted union of non-empty spans.
fn merge(spans: &[Span]) -> Vec<Span> {
    let mut v: Vec<Span> = spans
        .iter()
        .copied()
        .filter(|s| s.end_ms > s.start_ms)
        .collect();
    v.sort_by_key(|s| s.start_ms);
    let mut out: Vec<Span> = Vec::with_capacity(v.len());
    for s in v {
        match out.last_mut() {
            Some(last) if s.start_ms <= last.end_ms => last.end_ms = last.end_ms.max(s.end_ms),
            _ => out.push(s),
        }
    }
    out
}

/// Cost of `seconds` of machine time at `price_per_hour`; `None` when the
/// pool has no price.
pub fn cost(seconds: f64, price_per_hour: Option<f64>) -> Option<f64> {
    price_per_hour.map(|p| seconds / 3600.0 * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(a: i64, b: i64) -> Span {
        Span::new(a * 1000, b * 1000)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn examples() {
        // One run on a machine up for 100 s, running from 10 to 40.
        let (s, idle) = share_machine_time(&[sp(0, 100)], &[sp(10, 40)]);
        assert_eq!(s, vec![30.0]);
        assert_eq!(idle, 70.0);

        // Two runs overlapping 20..30: that stretch is split in half.
        let (s, idle) = share_machine_time(&[sp(0, 50)], &[sp(0, 30), sp(20, 40)]);
        assert_eq!(s, vec![25.0, 15.0]);
        assert_eq!(idle, 10.0);

        // Clipped to up spans: the run outlives the machine's first life and
        // continues after a restart (time while down is free).
        let (s, idle) = share_machine_time(&[sp(0, 10), sp(20, 30)], &[sp(5, 25)]);
        assert_eq!(s, vec![10.0]);
        assert_eq!(idle, 10.0);

        // Empty and out-of-range runs cost nothing.
        let (s, idle) = share_machine_time(&[sp(0, 10)], &[sp(5, 5), sp(20, 30), sp(7, 3)]);
        assert_eq!(s, vec![0.0, 0.0, 0.0]);
        assert_eq!(idle, 10.0);

        // Three identical runs share equally; no up time: nothing at all.
        let (s, idle) = share_machine_time(&[sp(0, 9)], &[sp(0, 9); 3]);
        assert!(s.iter().all(|x| close(*x, 3.0)) && idle == 0.0);
        assert_eq!(share_machine_time(&[], &[sp(0, 9)]), (vec![0.0], 0.0));

        // Overlapping up spans count once.
        let (s, idle) = share_machine_time(&[sp(0, 10), sp(5, 15)], &[]);
        assert!(s.is_empty());
        assert_eq!(idle, 15.0);
    }

    #[test]
    fn cost_per_hour() {
        assert_eq!(cost(1800.0, Some(3.2)), Some(1.6));
        assert_eq!(cost(1800.0, None), None);
        assert_eq!(cost(0.0, Some(3.2)), Some(0.0));
    }

    #[test]
    fn randomized_shares_add_up() {
        let mut rng = crate::pool::tests::Rng(0x1234_5678_9ABC_DEF1);
        for _ in 0..3000 {
            // Disjoint up spans, in random order.
            let mut t = rng.below(1000) as i64;
            let mut up = Vec::new();
            for _ in 0..rng.below(5) {
                let len = 1 + rng.below(100_000) as i64;
                up.push(Span::new(t, t + len));
                t += len + rng.below(50_000) as i64;
            }
            let n = up.len();
            for i in 0..n {
                up.swap(i, rng.below(n as u64) as usize);
            }
            let runs: Vec<Span> = (0..rng.below(12))
                .map(|_| {
                    let a = rng.below(t.max(1) as u64 + 1000) as i64 - 500;
                    Span::new(a, a + rng.below(80_000) as i64 - 1000)
                })
                .collect();
            let (shares, idle) = share_machine_time(&up, &runs);
            assert_eq!(shares.len(), runs.len());
            let total_up: f64 = up
                .iter()
                .map(|s| (s.end_ms - s.start_ms) as f64 / 1000.0)
                .sum();
            let total: f64 = shares.iter().sum::<f64>() + idle;
            assert!(
                (total - total_up).abs() < 1e-6,
                "{up:?} {runs:?}: {total} vs {total_up}"
            );
            for (r, s) in runs.iter().zip(&shares) {
                // Never more than the run's own up-time, never negative.
                let own: i64 = up
                    .iter()
                    .map(|u| (r.end_ms.min(u.end_ms) - r.start_ms.max(u.start_ms)).max(0))
                    .sum();
                assert!(
                    *s >= -1e-9 && *s <= own as f64 / 1000.0 + 1e-9,
                    "{r:?} {s} {own}"
                );
            }
        }
    }
}
