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
/// `preds[c][r]` is cut `c`'s (class, confidence) for held-out row `r` (an
/// empty vector: the cut is not in use); `labels[r]` is the full model's
/// class; `weights[r]` how many requests row `r` stands for (a row recorded
/// only because a hit was shadow-checked stands for 1/shadow_fraction of
/// them: without that, the window under-represents what caches answer and the
/// budget would be spent 1/shadow_fraction times over); `budget` is the
/// allowed fraction of requests answered differently from the full model. A
/// cut that would answer less than `min_hits` (weighted rows) is switched off.
pub fn tune(preds: &[Vec<(u32, f32)>], labels: &[u32], weights: &[f32], budget: f32, min_hits: f32) -> Vec<f32> {
    tune_shared(preds, labels, weights, budget, min_hits, 1.0)
}

/// [`tune`], but every cut before the last one in use may spend at most
/// `share` of the budget still left: a first cut that would take it all can
/// leave later cuts enough to certify their own exits (each pays the bound's
/// ~3 errors of slack, so a later cut left with less certifies nothing).
pub fn tune_shared(
    preds: &[Vec<(u32, f32)>],
    labels: &[u32],
    weights: &[f32],
    budget: f32,
    min_hits: f32,
    share: f32,
) -> Vec<f32> {
    let n = labels.len();
    let last_used = preds.iter().rposition(|c| c.len() == n);
    let total: f32 = if weights.len() == n { weights.iter().sum() } else { n as f32 };
    let w = |r: usize| weights.get(r).copied().unwrap_or(1.0);
    let mut allowed = budget.max(0.0) * total;
    let mut remaining: Vec<usize> = (0..n).collect();
    let mut out = Vec::with_capacity(preds.len());
    for (c, cut) in preds.iter().enumerate() {
        if cut.len() != n || remaining.is_empty() {
            out.push(OFF);
            continue;
        }
        let limit = if Some(c) == last_used { allowed } else { allowed * share.clamp(0.0, 1.0) };
        let mut order: Vec<usize> = remaining.clone();
        order.sort_by(|&a, &b| cut[b].1.total_cmp(&cut[a].1));
        // Longest prefix (by descending confidence) within the errors still allowed,
        // cut only between different confidence values so `conf >= t` selects it exactly.
        let (mut errors, mut taken) = (0f32, 0f32);
        let (mut best_len, mut best_errors, mut best_taken) = (0usize, 0f32, 0f32);
        for (i, &r) in order.iter().enumerate() {
            taken += w(r);
            if cut[r].0 != labels[r] {
                errors += w(r);
            }
            // One-sided ~95 % upper bound on the errors behind `errors` observed
            // (3 when none were: the rule of three): a prefix is taken only if even
            // that bound fits the budget left, so small held-out sets activate nothing.
            if errors_upper(errors) > limit {
                break;
            }
            let boundary = order.get(i + 1).is_none_or(|&next| cut[next].1 < cut[r].1);
            if boundary {
                (best_len, best_errors, best_taken) = (i + 1, errors, taken);
            }
        }
        if best_len == 0 || best_taken < min_hits.max(1.0) {
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
    (errors_upper(0.0) / budget).ceil() as usize
}

/// ~95 % upper bound on the expected errors given `e` observed.
fn errors_upper(e: f32) -> f32 {
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
        let t = tune(&[c0.clone(), c1.clone()], &labels, &[], 0.01, 1.0);
        let exits0: Vec<usize> = (0..n).filter(|&r| c0[r].1 >= t[0]).collect();
        let errs0 = exits0.iter().filter(|&&r| c0[r].0 != labels[r]).count();
        assert!((1..=5).contains(&errs0), "{t:?}: {errs0} errors admitted at cut 0");
        assert!(exits0.len() > 100, "cut 0 answers its sure rows");
        // Cut 1 is always right but the budget left after cut 0's bound may not
        // certify it: it is either off or takes every remaining row.
        assert!(t[1] == OFF || t[1] <= 0.8, "{t:?}");
        // No observed errors but too few rows to be sure: nothing activates.
        let perfect = vec![(0u32, 0.7f32); 100];
        assert_eq!(tune(&[perfect], &vec![0u32; 100], &[], 0.01, 1.0), vec![OFF]);
        // Enough rows: everything exits at cut 0.
        let perfect = vec![(0u32, 0.7f32); 1000];
        assert_eq!(tune(std::slice::from_ref(&perfect), &vec![0u32; 1000], &[], 0.01, 1.0), vec![0.7]);
        // Rows standing for many requests: 3 sure but wrong rows of weight 20
        // (shadow-checked hits) among 1000 right ones are 60 errors in 1060 requests.
        let mut mixed = vec![(1u32, 0.8f32); 3];
        mixed.extend(perfect);
        let mut weights = vec![20.0f32; 3];
        weights.extend(vec![1.0f32; 1000]);
        assert_eq!(tune(std::slice::from_ref(&mixed), &vec![0u32; 1003], &weights, 0.01, 1.0), vec![OFF]);
        assert_eq!(tune(&[mixed], &vec![0u32; 1003], &[], 0.01, 1.0), vec![0.7], "unweighted, 3 errors fit");
    }

    #[test]
    fn a_budget_share_leaves_later_cuts_enough_to_certify() {
        // Cut 0 is right on 60 % of rows at rising confidence, then wrong on
        // every other row: alone it takes the whole budget. Cut 1 is always right.
        let n = 3000;
        let labels = vec![0u32; n];
        let c0: Vec<(u32, f32)> =
            (0..n).map(|r| (if r < n * 6 / 10 || r % 2 == 0 { 0 } else { 1 }, 1.0 - r as f32 / n as f32)).collect();
        let c1 = vec![(0u32, 0.9f32); n];
        let greedy = tune(&[c0.clone(), c1.clone()], &labels, &[], 0.01, 1.0);
        let shared = tune_shared(&[c0.clone(), c1.clone()], &labels, &[], 0.01, 1.0, 0.5);
        let exits = |t: &[f32]| (0..n).filter(|&r| c0[r].1 >= t[0]).count();
        assert!(exits(&shared) < exits(&greedy), "{greedy:?} {shared:?}");
        assert_eq!(greedy[1], OFF, "the first cut spent it all: {greedy:?}");
        assert!(shared[1] <= 0.9, "the second cut certifies the rest: {shared:?}");
        // Errors admitted stay within the budget either way.
        let errors = (0..n).filter(|&r| c0[r].1 >= shared[0] && c0[r].0 != 0).count();
        assert!(errors as f32 <= 0.01 * n as f32, "{errors}");
    }

    #[test]
    fn useless_cut_is_switched_off() {
        let labels = vec![0u32, 1, 0, 1];
        let wrong = vec![(1u32, 0.9f32), (0, 0.9), (1, 0.9), (0, 0.9)];
        assert_eq!(tune(&[wrong], &labels, &[], 0.0, 1.0), vec![OFF]);
        assert_eq!(tune(&[], &labels, &[], 0.01, 1.0), Vec::<f32>::new());
    }
}
