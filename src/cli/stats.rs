//! Summary statistics the benchmarks share.

/// The `p`th percentile of `v` (nearest rank; sorts `v`), 0 when empty.
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_rank() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(super::percentile(&mut v, 50.0), 3.0);
        assert_eq!(super::percentile(&mut v, 100.0), 5.0);
        assert_eq!(super::percentile(&mut [], 99.0), 0.0);
    }
}
