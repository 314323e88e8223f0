//! `[[connection]]` tables: a Google project and how to authenticate to it.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::{is_env_name, Ctx, ManifestError};
use crate::connection::{
    check_endpoint, ConnectionSpec, CredentialsSpec, GOOGLE_COMPUTE_ENDPOINT,
    GOOGLE_PUBSUB_ENDPOINT, GOOGLE_STORAGE_ENDPOINT,
};
use crate::names::{validate_resource_id, ProjectName};

/// A `[[connection]]` table; at most one of `credentials_file`,
/// `token_env`, `metadata_server` (none: Application Default Credentials).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnection {
    name: Spanned<String>,
    project: Spanned<String>,
    credentials_file: Option<Spanned<String>>,
    token_env: Option<Spanned<String>>,
    metadata_server: Option<Spanned<bool>>,
    pubsub_endpoint: Option<Spanned<String>>,
    storage_endpoint: Option<Spanned<String>>,
    compute_endpoint: Option<Spanned<String>>,
}

pub(super) fn parse_connection(
    cx: &Ctx<'_>,
    c: &RawConnection,
) -> Result<ConnectionSpec, ManifestError> {
    validate_resource_id("connection", c.name.get_ref())
        .map_err(|e| cx.err(c.name.span(), e.message))?;
    ProjectName::from_id(c.project.get_ref()).map_err(|e| cx.err(c.project.span(), e.message))?;
    let mut chosen: Vec<Range<usize>> = Vec::new();
    let mut credentials = CredentialsSpec::Adc;
    if let Some(f) = &c.credentials_file {
        if f.get_ref().trim().is_empty() {
            return Err(cx.err(f.span(), "credentials_file must not be empty"));
        }
        credentials = CredentialsSpec::File {
            path: f.get_ref().clone(),
        };
        chosen.push(f.span());
    }
    if let Some(t) = &c.token_env {
        if !is_env_name(t.get_ref()) {
            return Err(cx.err(t.span(), "token_env must name an environment variable"));
        }
        credentials = CredentialsSpec::TokenEnv {
            env: t.get_ref().clone(),
        };
        chosen.push(t.span());
    }
    if let Some(b) = &c.metadata_server {
        if *b.get_ref() {
            credentials = CredentialsSpec::Metadata;
            chosen.push(b.span());
        }
    }
    if chosen.len() > 1 {
        return Err(cx.err(
            chosen[1].clone(),
            "a connection takes one of credentials_file, token_env, metadata_server (none: Application Default Credentials)",
        ));
    }
    let endpoint = |v: &Option<Spanned<String>>, dflt: &str, what: &str| match v {
        None => Ok(dflt.to_string()),
        Some(s) => {
            check_endpoint(s.get_ref()).map_err(|e| cx.err(s.span(), format!("{what}: {e}")))
        }
    };
    Ok(ConnectionSpec {
        name: c.name.get_ref().clone(),
        project: c.project.get_ref().clone(),
        credentials,
        pubsub_endpoint: endpoint(
            &c.pubsub_endpoint,
            GOOGLE_PUBSUB_ENDPOINT,
            "pubsub_endpoint",
        )?,
        storage_endpoint: endpoint(
            &c.storage_endpoint,
            GOOGLE_STORAGE_ENDPOINT,
            "storage_endpoint",
        )?,
        compute_endpoint: endpoint(
            &c.compute_endpoint,
            GOOGLE_COMPUTE_ENDPOINT,
            "compute_endpoint",
        )?,
    })
}

/// The declared connection a job or pool names, if it names one.
pub(super) fn connection_ref(
    cx: &Ctx<'_>,
    connections: &[ConnectionSpec],
    named: &Option<Spanned<String>>,
) -> Result<Option<ConnectionSpec>, ManifestError> {
    let Some(c) = named else {
        return Ok(None);
    };
    let found = connections.iter().find(|x| &x.name == c.get_ref());
    found.cloned().map(Some).ok_or_else(|| {
        cx.err(
            c.span(),
            format!(
                "connection \"{}\" is not declared; add a [[connection]] with name = \"{}\"",
                c.get_ref(),
                c.get_ref()
            ),
        )
    })
}

named!(RawConnection => "connection");
