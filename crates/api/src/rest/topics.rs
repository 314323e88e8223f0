//! Handlers of `/v1/projects/P/topics...`.

use super::*;

pub(super) async fn topic_resource(ps: PubSub, mut on: Resource, body: Body) -> Outcome {
    let (id, verb) = split_verb(&on.segment);
    let name = topic_name(&on.project, id);
    match verb {
        None => {
            parse_query(on.query.take(), &[])?;
            match on.method {
                Method::PUT => {
                    let t: TopicJson = parse_body(body)?;
                    Ok(topic_json(&ps.create_topic(t.into_pb("", name)?).await?))
                }
                Method::GET => Ok(topic_json(
                    &ps.get_topic(pb::GetTopicRequest { topic: name })?,
                )),
                Method::PATCH => {
                    let (topic, update_mask) = parse_update::<TopicJson>(body, "topic")?;
                    let topic = Some(topic.into_pb("topic.", name)?);
                    let r = pb::UpdateTopicRequest { topic, update_mask };
                    Ok(topic_json(&ps.update_topic(r).await?))
                }
                Method::DELETE => deleted(
                    ps.delete_topic(pb::DeleteTopicRequest { topic: name })
                        .await,
                ),
                _ => Err(on.not_allowed(STANDARD_METHODS)),
            }
        }
        Some("publish") => {
            if on.method != Method::POST {
                return Err(on.not_allowed("POST"));
            }
            parse_query(on.query.take(), &[])?;
            let p: PublishJson = parse_body(body)?;
            let mut messages = Vec::with_capacity(p.messages.len());
            for (i, m) in p.messages.into_iter().enumerate() {
                let m: MessageJson = from_object(&format!("messages[{i}]"), m)?;
                let data = match m.data.as_deref() {
                    None | Some("") => Bytes::new(),
                    Some(s) => decode_base64(s).map_err(|e| {
                        Error::invalid(format!(
                            "Invalid value at 'messages[{i}].data' (TYPE_BYTES), base64 decoding failed: {e}"
                        ))
                    })?,
                };
                messages.push(pb::PubsubMessage {
                    data,
                    attributes: m.attributes,
                    message_id: m.message_id.unwrap_or_default(),
                    publish_time: timestamp(
                        &format!("messages[{i}].publish_time"),
                        &m.publish_time,
                    )?,
                    ordering_key: m.ordering_key.unwrap_or_default(),
                });
            }
            let r = ps
                .publish(pb::PublishRequest {
                    topic: name,
                    messages,
                })
                .await?;
            let mut m = Map::new();
            m.insert("messageIds".into(), r.message_ids.into());
            Ok(Value::Object(m))
        }
        Some(other) => Err(unknown_verb(&on.uri, "topics", other, "publish")),
    }
}
