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
    let mut allowed = budget.max(0.0) * n as f32;
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
            // One-sided ~95 % upper bound on the errors behind `errors` observed
            // (3 when none were: the rule of three): a prefix is taken only if even
            // that bound fits the budget left, so small held-out sets activate nothing.
            if errors_upper(errors) > allowed {
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
        allowed -= errors_upper(best_errors).min(allowed);
        remaining = order[best_len..].to_vec();
        out.push(threshold);
    }
    out
}

/// Fewest held-out rows that could certify any exit under `budget`: with zero
/// errors observed the bound is still ~3 errors (rule of three).
pub fn min_certifiable_rows(budget: f32) -> usize {
    if budget <= 0.0 {
        return usize::MAX;
    }
    (errors_upper(0) / budget).ceil() as usize
}

/// ~95 % upper bound on the expected errors given `e` observed.
fn errors_upper(e: usize) -> f32 {
    let e = e as f32;
    e + 1.645 * (e + 1.0).sqrt() + 1.35
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_errors_stay_within_budget() {
        // 1000 rows, label 0. Cut 0: sure and right on 500 rows, sure and wrong on 12.
        let n = 1000;
        let labels = vec![0u32; n];
        let mut c0 = vec![(0u32, 0.1f32); n];
        for (i, p) in c0.iter_mut().enumerate().take(500) {
            *p = (0, 0.5 + i as f32 * 0.0009);
        }
        for k in 0..12 {
            c0[600 + k] = (1, 0.55 + k as f32 * 0.03);
        }
        let c1 = vec![(0u32, 0.8f32); n];
        let t = tune(&[c0.clone(), c1.clone()], &labels, 0.01, 1);
        let exits0: Vec<usize> = (0..n).filter(|&r| c0[r].1 >= t[0]).collect();
        let errs0 = exits0.iter().filter(|&&r| c0[r].0 != labels[r]).count();
        assert!((1..=5).contains(&errs0), "{t:?}: {errs0} errors admitted at cut 0");
        assert!(exits0.len() > 100, "cut 0 answers its sure rows");
        // Cut 1 is always right but the budget left after cut 0's bound may not
        // certify it: it is either off or takes every remaining row.
        assert!(t[1] == OFF || t[1] <= 0.8, "{t:?}");
        // No observed errors but too few rows to be sure: nothing activates.
        let perfect = vec![(0u32, 0.7f32); 100];
        assert_eq!(tune(&[perfect], &vec![0u32; 100], 0.01, 1), vec![OFF]);
        // Enough rows: everything exits at cut 0.
        let perfect = vec![(0u32, 0.7f32); 1000];
        assert_eq!(tune(&[perfect], &vec![0u32; 1000], 0.01, 1), vec![0.7]);
    }

    #[test]
    fn useless_cut_is_switched_off() {
        let labels = vec![0u32, 1, 0, 1];
        let wrong = vec![(1u32, 0.9f32), (0, 0.9), (1, 0.9), (0, 0.9)];
        assert_eq!(tune(&[wrong], &labels, 0.0, 1), vec![OFF]);
        assert_eq!(tune(&[], &labels, 0.01, 1), Vec::<f32>::new());
    }
}
