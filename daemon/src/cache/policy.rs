//! Thresholds under the accuracy budget.
//!
//! A row exits at the first cut whose cache is at least as confident as that
//! cut's threshold. Thresholds are tuned on held-out traffic, cut by cut in
//! graph order, so that the *cumulative* disagreement with the full model over
//! all cuts stays within the budget; earlier cuts save more work, so each takes
//! as many exits as the budget left allows.

/// Threshold meaning "this cut never answers".
pub const OFF: f32 = f32::INFINITY;

/// Thresholds per cut from held-out predictions.
///
/// `preds[c][r]` is cut `c`'s (class, confidence) for held-out row `r`;
/// `labels[r]` is the full model's class; `budget` is the allowed fraction of
/// rows answered differently from the full model. A cut that would answer
/// fewer than `min_hits` rows is switched off (its lookups would not pay).
pub fn tune(preds: &[Vec<(u32, f32)>], labels: &[u32], budget: f32, min_hits: usize) -> Vec<f32> {
    let n = labels.len();
    let mut allowed = (budget.max(0.0) * n as f32).floor() as usize;
    let mut remaining: Vec<usize> = (0..n).collect();
    let mut out = Vec::with_capacity(preds.len());
    for cut in preds {
        if cut.len() != n || remaining.is_empty() {
            out.push(OFF);
            continue;
        }
        let mut order: Vec<usize> = remaining.clone();
        order.sort_by(|&a, &b| cut[b].1.total_cmp(&cut[a].1));
        // Longest prefix (by descending confidence) within the errors still allowed,
        // cut only between different confidence values so `conf >= t` selects it exactly.
        let (mut errors, mut best_len, mut best_errors) = (0usize, 0usize, 0usize);
        for (i, &r) in order.iter().enumerate() {
            if cut[r].0 != labels[r] {
                errors += 1;
            }
            // One-sided 95 % upper bound on the errors (the held-out set is small):
            // a prefix is taken only if even that bound fits the budget left.
            if errors as f32 + 1.645 * (errors as f32 + 1.0).sqrt() > allowed as f32 + 1.645 {
                break;
            }
            let boundary = order.get(i + 1).is_none_or(|&next| cut[next].1 < cut[r].1);
            if boundary {
                (best_len, best_errors) = (i + 1, errors);
            }
        }
        if best_len < min_hits.max(1) {
            out.push(OFF);
            continue;
        }
        let threshold = cut[order[best_len - 1]].1;
        allowed -= best_errors;
        remaining = order[best_len..].to_vec();
        out.push(threshold);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_errors_stay_within_budget() {
        // 100 rows, label 0. Cut 0: sure and right on 50 rows, sure and wrong on 2.
        let labels = vec![0u32; 100];
        let mut c0 = vec![(0u32, 0.1f32); 100];
        for (i, p) in c0.iter_mut().enumerate().take(50) {
            *p = (0, 0.9 + i as f32 * 0.001);
        }
        c0[60] = (1, 0.95);
        c0[61] = (1, 0.99);
        let c1 = vec![(0u32, 0.8f32); 100];
        let t = tune(&[c0.clone(), c1.clone()], &labels, 0.01, 1);
        // One error allowed: cut 0 must stop before the 0.95 wrong row.
        assert!(t[0] > 0.95, "{t:?}");
        let exits0: Vec<usize> = (0..100).filter(|&r| c0[r].1 >= t[0]).collect();
        let errs0 = exits0.iter().filter(|&&r| c0[r].0 != labels[r]).count();
        assert!(errs0 <= 1);
        // Cut 1 is always right: takes every remaining row.
        assert!(t[1] <= 0.8);
        // Zero budget and perfect caches: everything exits at cut 0.
        let perfect = vec![(0u32, 0.7f32); 100];
        assert_eq!(tune(&[perfect], &labels, 0.0, 1), vec![0.7]);
    }

    #[test]
    fn useless_cut_is_switched_off() {
        let labels = vec![0u32, 1, 0, 1];
        let wrong = vec![(1u32, 0.9f32), (0, 0.9), (1, 0.9), (0, 0.9)];
        assert_eq!(tune(&[wrong], &labels, 0.0, 1), vec![OFF]);
        assert_eq!(tune(&[], &labels, 0.01, 1), Vec::<f32>::new());
    }
}
