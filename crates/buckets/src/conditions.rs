//! Request preconditions: `ifGenerationMatch`, `ifGenerationNotMatch`,
//! `ifMetagenerationMatch`, `ifMetagenerationNotMatch` (and the `Source`
//! variants of copy/rewrite). An absent object has generation 0, so
//! `ifGenerationMatch=0` means "only if it does not exist yet".

use serde::{Deserialize, Serialize};

use crate::error::{GcsError, GcsResult};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conditions {
    pub if_generation_match: Option<i64>,
    pub if_generation_not_match: Option<i64>,
    pub if_metageneration_match: Option<i64>,
    pub if_metageneration_not_match: Option<i64>,
}

pub const PRECONDITION_FAILED: &str =
    "At least one of the pre-conditions you specified did not hold.";

impl Conditions {
    /// Reads the four parameters, each with an optional prefix (`ifSource…`).
    pub fn from_query(q: &impl Fn(&str) -> Option<String>, source: bool) -> GcsResult<Self> {
        let p = if source { "ifSource" } else { "if" };
        let get = |k: &str| -> GcsResult<Option<i64>> {
            let key = format!("{p}{k}");
            match q(&key) {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
                    GcsError::invalid(format!(
                        "Invalid value for parameter '{key}': '{v}' is not an integer"
                    ))
                }),
            }
        };
        Ok(Conditions {
            if_generation_match: get("GenerationMatch")?,
            if_generation_not_match: get("GenerationNotMatch")?,
            if_metageneration_match: get("MetagenerationMatch")?,
            if_metageneration_not_match: get("MetagenerationNotMatch")?,
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == Conditions::default()
    }

    /// Checks against the live object (`(generation, metageneration)`), or
    /// its absence. On reads a failed "not match" is 304 Not Modified, as in
    /// Cloud Storage; everything else that fails is 412.
    pub fn check(&self, live: Option<(i64, i64)>, read: bool) -> GcsResult<()> {
        let gen = live.map(|l| l.0).unwrap_or(0);
        let fail = || Err(GcsError::precondition(PRECONDITION_FAILED));
        if let Some(g) = self.if_generation_match {
            if g != gen {
                return fail();
            }
        }
        if let Some(m) = self.if_metageneration_match {
            match live {
                Some((_, meta)) if meta == m => {}
                _ => return fail(),
            }
        }
        if let Some(g) = self.if_generation_not_match {
            if g == gen {
                return if read {
                    Err(GcsError::not_modified())
                } else {
                    fail()
                };
            }
        }
        if let Some(m) = self.if_metageneration_not_match {
            match live {
                Some((_, meta)) if meta != m => {}
                Some(_) if read => return Err(GcsError::not_modified()),
                _ => return fail(),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(gm: Option<i64>, gnm: Option<i64>, mm: Option<i64>, mnm: Option<i64>) -> Conditions {
        Conditions {
            if_generation_match: gm,
            if_generation_not_match: gnm,
            if_metageneration_match: mm,
            if_metageneration_not_match: mnm,
        }
    }

    #[test]
    fn generation_zero_means_absent() {
        let only_new = c(Some(0), None, None, None);
        only_new.check(None, false).unwrap();
        assert_eq!(only_new.check(Some((5, 1)), false).unwrap_err().status, 412);
    }

    #[test]
    fn match_and_not_match() {
        let live = Some((7, 2));
        c(Some(7), None, Some(2), None).check(live, false).unwrap();
        c(None, Some(6), None, Some(1)).check(live, false).unwrap();
        // (conditions, the object's (generation, metageneration), a read?, status)
        let failing = [
            (c(Some(8), None, None, None), live, false, 412),
            (c(None, None, Some(3), None), live, false, 412),
            (c(None, Some(7), None, None), live, false, 412),
            (c(None, Some(7), None, None), live, true, 304),
            (c(None, None, None, Some(2)), live, true, 304),
            (c(Some(7), None, None, None), None, false, 412),
        ];
        for (conds, object, read, status) in failing {
            assert_eq!(conds.check(object, read).unwrap_err().status, status);
        }
    }

    #[test]
    fn parses_query() {
        let q = |k: &str| match k {
            "ifGenerationMatch" => Some("0".to_string()),
            "ifSourceMetagenerationMatch" => Some("3".to_string()),
            _ => None,
        };
        assert_eq!(
            Conditions::from_query(&q, false)
                .unwrap()
                .if_generation_match,
            Some(0)
        );
        assert_eq!(
            Conditions::from_query(&q, true)
                .unwrap()
                .if_metageneration_match,
            Some(3)
        );
        let bad = |_: &str| Some("x".to_string());
        assert!(Conditions::from_query(&bad, false).is_err());
    }
}
