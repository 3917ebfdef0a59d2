//! Medians and ratios, the only statistics the report uses.

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    } else {
        sorted[mid]
    })
}

/// `value / base`, or `None` when the base is not a positive number.
pub fn ratio(value: f64, base: f64) -> Option<f64> {
    (base > 0.0 && base.is_finite() && value.is_finite()).then(|| value / base)
}

/// The median over repetitions of each repetition's ratio to the untraced run of the same
/// repetition; pairing them cancels slow drifts of the host's speed.
pub fn paired_ratio(values: &[f64], bases: &[f64]) -> Option<f64> {
    median(&paired_ratios(values, bases))
}

/// Each repetition's ratio to the untraced run of the same repetition.
pub fn paired_ratios(values: &[f64], bases: &[f64]) -> Vec<f64> {
    values
        .iter()
        .zip(bases)
        .filter_map(|(v, b)| ratio(*v, *b))
        .collect()
}

/// The smallest and largest value.
pub fn range(values: &[f64]) -> Option<(f64, f64)> {
    let min = values.iter().copied().reduce(f64::min)?;
    let max = values.iter().copied().reduce(f64::max)?;
    Some((min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn ratios_pair_repetitions() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        // Repetition 2 ran on a slower host: paired, its ratio is still 1.1.
        let none = [2.0, 4.0, 2.0];
        let traced = [2.2, 4.4, 2.4];
        let paired = paired_ratio(&traced, &none).unwrap();
        assert!((paired - 1.1).abs() < 1e-9, "{paired}");
        assert_eq!(range(&traced), Some((2.2, 4.4)));
    }
}
