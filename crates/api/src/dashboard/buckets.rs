//! Buckets: browse objects by prefix ("folders" at `/`), download.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use maud::html;
use pubrun_buckets::{Buckets, Conditions, ListParams, ObjectResource};
use serde::Deserialize;

use super::layout::{self, enc, time_ms, Nav};
use super::{Ctx, UiError, UiResult};

fn service(ctx: &Ctx) -> Result<&Buckets, UiError> {
    super::enabled(&ctx.d.inner.buckets, "buckets")
}

pub(crate) async fn list(ctx: Ctx) -> UiResult {
    let (buckets, _) = service(&ctx)?
        .list_buckets(None, String::new(), None, 1000)
        .await?;
    let body = html! {
        h1 { "Buckets" }
        (layout::listing(buckets.is_empty(), html! { "No buckets. Create them with a Cloud Storage client or " code { "[[bucket]]" } " in " code { "pubrun.toml" } "." }, html! {
            table #buckets {
                thead { tr { th { "Bucket" } th { "Project" } th { "Created (UTC)" } } }
                tbody { @for b in &buckets { tr {
                    td { a href={"/ui/buckets/" (enc(&b.name))} { (b.name) } }
                    td { (b.project) }
                    td { (time_ms(b.created_us / 1000)) }
                } } }
            }
        }))
    };
    Ok(layout::page(&ctx, "Buckets", Nav::Buckets, body))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct ObjectsQuery {
    prefix: String,
    page_token: Option<String>,
    /// Every object under the prefix, full names, no folders.
    flat: bool,
}

pub(crate) async fn objects(
    ctx: Ctx,
    Path(bucket): Path<String>,
    q: Result<Query<ObjectsQuery>, QueryRejection>,
) -> UiResult {
    let q = super::query(q)?;
    let page = service(&ctx)?
        .list_objects(
            &bucket,
            ListParams {
                prefix: q.prefix.clone(),
                delimiter: (!q.flat).then(|| "/".into()),
                page_token: q.page_token.clone(),
                max_results: 200,
                ..Default::default()
            },
        )
        .await?;
    let base = format!("/ui/buckets/{}", enc(&bucket));
    // Breadcrumbs: each `/`-ended part of the prefix.
    let mut crumbs = Vec::new();
    let mut acc = String::new();
    for part in q.prefix.split_inclusive('/') {
        acc.push_str(part);
        crumbs.push((part.to_string(), acc.clone()));
    }
    let body = html! {
        h1 { "Bucket " (bucket) }
        p #path {
            a href=(base) { "gs://" (bucket) "/" }
            @for (part, full) in &crumbs { a href={(base) "?prefix=" (enc(full))} { (part) } }
            " · "
            @if q.flat { a href={(base) "?prefix=" (enc(&q.prefix))} { "show folders" } }
            @else { a #flat href={(base) "?flat=true&prefix=" (enc(&q.prefix))} { "list every object under here" } }
        }
        (layout::listing(page.items.is_empty() && page.prefixes.is_empty(), html! { "No objects here." }, html! {
            table #objects {
                thead { tr { th { "Name" } th.num { "Size" } th { "Type" } th { "Updated (UTC)" } th.num { "Generation" } } }
                tbody {
                    @for p in &page.prefixes {
                        tr.folder { td colspan="5" { a href={(base) "?prefix=" (enc(p))} { (p.strip_prefix(q.prefix.as_str()).unwrap_or(p)) } } }
                    }
                    @for o in &page.items {
                        tr {
                            td { a.object href={(base) "/download?name=" (enc(&o.name))} download {
                                @if q.flat { (o.name) } @else { (o.name.strip_prefix(q.prefix.as_str()).unwrap_or(&o.name)) }
                            } }
                            td.num { (layout::bytes(o.size)) }
                            td { (o.content_type()) }
                            td { (time_ms(o.updated_us / 1000)) }
                            td.num { (o.generation) }
                        }
                    }
                }
            }
        }))
        @if let Some(t) = &page.next_page_token {
            div.pager { a href={(base) "?prefix=" (enc(&q.prefix)) "&page_token=" (enc(t)) @if q.flat { "&flat=true" }} { "More »" } }
        }
    };
    Ok(layout::page(
        &ctx,
        &format!("Bucket {bucket}"),
        Nav::Buckets,
        body,
    ))
}

#[derive(Deserialize)]
pub(crate) struct DownloadQuery {
    name: String,
}

/// The object's bytes, always as an attachment of a neutral type: an
/// uploaded HTML file must never render as a page of this origin.
pub(crate) async fn download(
    ctx: Ctx,
    Path(bucket): Path<String>,
    q: Result<Query<DownloadQuery>, QueryRejection>,
) -> UiResult {
    let q = super::query(q)?;
    let (row, file) = service(&ctx)?
        .open_object(&bucket, &q.name, None, Conditions::default())
        .await?;
    let leaf = row.name.rsplit('/').next().unwrap_or(&row.name);
    let disposition = format!(
        "attachment; filename=\"{}\"; filename*=UTF-8''{}",
        leaf.chars()
            .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            })
            .collect::<String>(),
        enc(leaf)
    );
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(row.size));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}
