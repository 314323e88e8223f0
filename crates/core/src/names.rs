//! Resource names (`projects/P/topics/T`, `projects/P/subscriptions/S`) and
//! the rules Google documents for them.

use std::fmt;

use crate::error::{Error, Result};

/// What a deleted topic's subscriptions report as their topic.
pub const DELETED_TOPIC: &str = "_deleted-topic_";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectName(String);

impl ProjectName {
    /// Parses `projects/P`.
    pub fn parse(full: &str) -> Result<Self> {
        let id = full.strip_prefix("projects/").ok_or_else(|| {
            Error::invalid(format!(
                "invalid project name \"{full}\": expected projects/PROJECT_ID"
            ))
        })?;
        Self::from_id(id)
    }

    pub fn from_id(id: &str) -> Result<Self> {
        // Google's project IDs are stricter; emulators accept any non-empty id
        // without a slash, and so do we so that test projects like "test_1" work.
        if id.is_empty()
            || id.len() > 100
            || id.contains('/')
            || id.chars().any(char::is_whitespace)
        {
            return Err(Error::invalid(format!(
                "invalid project id \"{id}\": must be 1 to 100 characters without '/' or spaces"
            )));
        }
        Ok(ProjectName(id.to_string()))
    }

    pub fn id(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "projects/{}", self.0)
    }
}

/// Validates a topic, subscription or snapshot id as Google documents it:
/// 3..=255 characters, starts with a letter, then letters, digits and
/// `- . _ ~ % +`; must not start with `goog`.
pub fn validate_resource_id(kind: &str, id: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::invalid(format!(
            "invalid {kind} id \"{}\": {why}",
            truncate(id)
        )))
    };
    if id.len() < 3 || id.len() > 255 {
        return bad("must be between 3 and 255 characters long");
    }
    if !id.as_bytes()[0].is_ascii_alphabetic() {
        return bad("must start with a letter");
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~%+".contains(*c)))
    {
        return bad(&format!(
            "character {c:?} is not allowed; use letters, digits, '-', '.', '_', '~', '%' or '+'"
        ));
    }
    if id.to_ascii_lowercase().starts_with("goog") {
        return bad("must not start with \"goog\"");
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    if s.len() <= 80 {
        s.to_string()
    } else {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

macro_rules! resource_name {
    ($ty:ident, $collection:literal, $kind:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty {
            project: ProjectName,
            id: String,
        }

        impl $ty {
            /// Parses the full name `projects/P/<collection>/ID`.
            pub fn parse(full: &str) -> Result<Self> {
                let bad = || {
                    Error::invalid(format!(
                        concat!(
                            "invalid ",
                            $kind,
                            " name \"{}\": expected projects/PROJECT_ID/",
                            $collection,
                            "/ID"
                        ),
                        truncate(full)
                    ))
                };
                let (project, tail) = full
                    .strip_prefix("projects/")
                    .and_then(|r| r.split_once('/'))
                    .ok_or_else(bad)?;
                let id = tail
                    .strip_prefix(concat!($collection, "/"))
                    .ok_or_else(bad)?;
                Self::new(ProjectName::from_id(project)?, id)
            }

            pub fn new(project: ProjectName, id: &str) -> Result<Self> {
                validate_resource_id($kind, id)?;
                Ok($ty {
                    project,
                    id: id.to_string(),
                })
            }

            pub fn project(&self) -> &ProjectName {
                &self.project
            }

            pub fn id(&self) -> &str {
                &self.id
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!("{}/", $collection, "/{}"), self.project, self.id)
            }
        }
    };
}

resource_name!(TopicName, "topics", "topic");
resource_name!(SubscriptionName, "subscriptions", "subscription");
resource_name!(SnapshotName, "snapshots", "snapshot");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let t = TopicName::parse("projects/demo/topics/uploads").unwrap();
        assert_eq!(t.project().id(), "demo");
        assert_eq!(t.id(), "uploads");
        assert_eq!(t.to_string(), "projects/demo/topics/uploads");
        let s = SubscriptionName::parse("projects/demo/subscriptions/fit-model.v2").unwrap();
        assert_eq!(s.to_string(), "projects/demo/subscriptions/fit-model.v2");
    }

    #[test]
    fn rejects_what_google_rejects() {
        for bad in [
            "projects/demo/topics/ab",
            "projects/demo/topics/1abc",
            "projects/demo/topics/googthing",
            "projects/demo/topics/has space",
            "projects/demo/topics/a/b/c",
            "projects/demo/subscriptions/abc",
            "topics/abc",
            "projects//topics/abc",
        ] {
            let err = TopicName::parse(bad).unwrap_err();
            assert_eq!(err.code, crate::Code::InvalidArgument, "{bad}");
        }
        let long = format!("projects/p/topics/a{}", "b".repeat(255));
        assert!(TopicName::parse(&long).is_err());
        let max = format!("projects/p/topics/a{}", "b".repeat(254));
        assert!(TopicName::parse(&max).is_ok());
    }

    #[test]
    fn error_says_what_to_fix() {
        let err = TopicName::parse("projects/p/topics/9lives").unwrap_err();
        assert!(
            err.message.contains("must start with a letter"),
            "{}",
            err.message
        );
        let err = TopicName::parse("projects/p/topics/a*b").unwrap_err();
        assert!(err.message.contains("'*'"), "{}", err.message);
    }
}
