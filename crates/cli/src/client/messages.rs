//! `pubrun publish` and `pubrun pull`.

use std::io::Read;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Map, Value};

use super::api::Api;
use super::resources::string_map;
use super::{names, output, MessageArgs, PublishArgs, PullArgs};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub async fn publish(args: PublishArgs) -> Result<()> {
    let conn = &args.conn;
    let topic = names::topic(&conn.project, &args.topic)?;
    let data = read_data(args.data.as_deref(), &args.message)?;
    if data.is_empty() && args.message.attrs.is_empty() {
        bail!("nothing to publish: give --data TEXT, --data-file FILE (- for stdin) or at least one --attr KEY=VALUE");
    }
    let mut message = Map::new();
    message.insert("data".into(), json!(B64.encode(&data)));
    message.insert(
        "attributes".into(),
        string_map("attribute", &args.message.attrs)?,
    );
    if let Some(k) = &args.ordering_key {
        message.insert("orderingKey".into(), json!(k));
    }
    let api = Api::new(conn)?;
    let path = format!("{}:publish", names::topic_path(&topic));
    let resp = api
        .post(&path, &json!({ "messages": [Value::Object(message)] }))
        .await?;
    if conn.json {
        return output::json(&resp);
    }
    let id = resp
        .get("messageIds")
        .and_then(Value::as_array)
        .and_then(|ids| ids.first())
        .map(output::display)
        .ok_or_else(|| {
            anyhow!("server accepted the publish to {topic} but returned no message id: {resp}")
        })?;
    output::out(&format!("{id}\n"))
}

/// Message data from `--data TEXT` or `--data-file FILE` ("-" = stdin);
/// empty when neither is given.
pub fn read_data(text: Option<&str>, m: &MessageArgs) -> Result<Vec<u8>> {
    Ok(match (text, m.data_file.as_deref()) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading message data from standard input")?;
            buf
        }
        (None, Some(path)) => std::fs::read(path)
            .with_context(|| format!("reading message data from {}", path.display()))?,
        (None, None) => Vec::new(),
    })
}

pub async fn pull(args: PullArgs) -> Result<()> {
    let conn = &args.conn;
    let sub = names::subscription(&conn.project, &args.subscription)?;
    let api = Api::new(conn)?;
    let base = names::subscription_path(&sub);
    let resp = api
        .post(
            &format!("{base}:pull"),
            &json!({ "maxMessages": args.max, "returnImmediately": true }),
        )
        .await?;
    let received = output::items(&resp, "receivedMessages");
    let ack_ids: Vec<&str> = received
        .iter()
        .filter_map(|r| r.get("ackId").and_then(Value::as_str))
        .collect();

    if conn.json {
        output::json(&resp)?;
    } else if received.is_empty() {
        eprintln!("no messages available on {sub}");
    } else {
        let blocks: Vec<String> = received.iter().map(render).collect();
        output::out(&blocks.join("\n"))?;
    }

    if args.ack && !ack_ids.is_empty() {
        if ack_ids.len() != received.len() {
            bail!(
                "server sent {} messages but only {} ack ids; nothing acknowledged",
                received.len(),
                ack_ids.len()
            );
        }
        api.post(&format!("{base}:acknowledge"), &json!({ "ackIds": ack_ids }))
            .await
            .context("the messages above were pulled but acknowledging them failed; they will be redelivered")?;
        if !conn.json {
            eprintln!("acknowledged {} message(s)", ack_ids.len());
        }
    } else if !args.ack && !ack_ids.is_empty() && !conn.json {
        eprintln!(
            "not acknowledged: {} message(s) will be redelivered after the ack deadline (use --ack)",
            ack_ids.len()
        );
    }
    Ok(())
}

/// One received message as an aligned block.
fn render(received: &Value) -> String {
    let msg = received.get("message").unwrap_or(&Value::Null);
    let get = |k: &str| msg.get(k).map(output::display).filter(|s| !s.is_empty());
    let mut rows: Vec<(&str, String)> = Vec::new();
    rows.push(("message id", get("messageId").unwrap_or_else(|| "-".into())));
    rows.push((
        "published",
        get("publishTime").unwrap_or_else(|| "-".into()),
    ));
    if let Some(k) = get("orderingKey") {
        rows.push(("ordering key", k));
    }
    if let Some(n) = received.get("deliveryAttempt").filter(|v| !v.is_null()) {
        rows.push(("delivery attempt", output::display(n)));
    }
    rows.push((
        "attributes",
        output::map_pairs(msg.get("attributes").unwrap_or(&Value::Null)),
    ));
    let data = msg.get("data").and_then(Value::as_str).unwrap_or("");
    let (label, shown) = show_data(data);
    rows.push((label, shown));
    output::block(&rows)
}

/// Data as text when it is UTF-8, otherwise as base64.
fn show_data(b64: &str) -> (&'static str, String) {
    let decoded = B64
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(b64));
    match decoded {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => ("data", text),
            Err(_) => ("data (base64)", b64.to_string()),
        },
        Err(_) => ("data (as sent, not base64)", b64.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_text_and_binary() {
        let m = json!({"ackId": "a", "message": {"data": B64.encode("hi there"), "messageId": "7",
            "publishTime": "2024-01-01T00:00:00Z", "attributes": {"k": "v"}}});
        let r = render(&m);
        assert!(r.contains("message id: 7\n"), "{r}");
        assert!(r.contains("data:       hi there\n"), "{r}");
        assert!(r.contains("attributes: k=v\n"), "{r}");
        let multi = json!({"message": {"data": B64.encode("a\nb\n"), "messageId": "9"}});
        assert!(
            render(&multi).ends_with("data:       a\n            b\n"),
            "{}",
            render(&multi)
        );
        let bin = json!({"message": {"data": B64.encode([0xff, 0x00, 0xfe]), "messageId": "8"}});
        let r = render(&bin);
        assert!(r.contains("data (base64): /wD+\n"), "{r}");
    }
}
