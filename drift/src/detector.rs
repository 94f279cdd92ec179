//! Thresholds with hysteresis.
//!
//! A [`Flag`] is raised when its score has been at or above `raise` for
//! `raise_after` consecutive windows, and cleared when it has been below
//! `clear` (≤ `raise`) for `clear_after` consecutive windows. Between the two
//! thresholds nothing changes, so a score hovering around one threshold does
//! not make the flag flap. A window without a score (too few inputs) leaves
//! the flag and its counters as they are.

use serde::{Deserialize, Serialize};

/// Thresholds of one signal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hysteresis {
    /// Score at or above which a window counts towards raising.
    pub raise: f64,
    /// Score below which a window counts towards clearing.
    pub clear: f64,
    /// Consecutive high windows that raise the flag.
    pub raise_after: u32,
    /// Consecutive low windows that clear it.
    pub clear_after: u32,
}

impl Hysteresis {
    /// Checks the thresholds; `field` names them in the error.
    pub fn validate(&self, field: &str) -> Result<(), String> {
        if !(self.raise.is_finite() && self.clear.is_finite()) || self.clear > self.raise {
            return Err(format!(
                "{field}: need finite thresholds with clear ≤ raise (got raise {}, clear {})",
                self.raise, self.clear
            ));
        }
        if self.raise_after == 0 || self.clear_after == 0 {
            return Err(format!("{field}: raise_after and clear_after must be ≥ 1"));
        }
        Ok(())
    }
}

/// A change of a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transition {
    /// The flag went up.
    Raised,
    /// The flag went down.
    Cleared,
}

/// The state of one flag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    /// Whether the flag is up.
    pub raised: bool,
    /// Consecutive windows counting towards the next transition.
    pub streak: u32,
}

impl Flag {
    /// Feeds one window's score (`None`: no score this window).
    pub fn update(&mut self, h: &Hysteresis, score: Option<f64>) -> Option<Transition> {
        let score = score?;
        if !self.raised {
            if score >= h.raise {
                self.streak += 1;
            } else {
                self.streak = 0;
            }
            if self.streak >= h.raise_after {
                *self = Flag {
                    raised: true,
                    streak: 0,
                };
                return Some(Transition::Raised);
            }
        } else {
            if score < h.clear {
                self.streak += 1;
            } else {
                self.streak = 0;
            }
            if self.streak >= h.clear_after {
                *self = Flag::default();
                return Some(Transition::Cleared);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Hysteresis = Hysteresis {
        raise: 0.2,
        clear: 0.1,
        raise_after: 2,
        clear_after: 3,
    };

    fn run(scores: &[Option<f64>]) -> Vec<Option<Transition>> {
        let mut f = Flag::default();
        scores.iter().map(|&s| f.update(&H, s)).collect()
    }

    #[test]
    fn raises_after_consecutive_high_windows_only() {
        use Transition::*;
        let t = run(&[Some(0.3), Some(0.05), Some(0.3), None, Some(0.25)]);
        // The low window resets the streak; a missing window does not.
        assert_eq!(t, vec![None, None, None, None, Some(Raised)]);
    }

    #[test]
    fn scores_between_the_thresholds_neither_raise_nor_clear() {
        use Transition::*;
        let t = run(&[
            Some(0.3),
            Some(0.3),
            Some(0.15),
            Some(0.15),
            Some(0.15),
            Some(0.05),
            Some(0.05),
            Some(0.05),
        ]);
        assert_eq!(
            t,
            vec![
                None,
                Some(Raised),
                None,
                None,
                None,
                None,
                None,
                Some(Cleared)
            ]
        );
    }

    #[test]
    fn invalid_thresholds_name_the_field() {
        let bad = Hysteresis { clear: 0.3, ..H };
        assert!(
            bad.validate("drift.covariate")
                .unwrap_err()
                .contains("drift.covariate")
        );
        let bad = Hysteresis {
            raise_after: 0,
            ..H
        };
        assert!(bad.validate("x").is_err());
        assert!(H.validate("x").is_ok());
    }
}
