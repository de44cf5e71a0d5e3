// NativeStream: one client's Stream or StreamMulti call.
#include <grpcpp/alarm.h>

#include <algorithm>
#include <chrono>
#include <string>

#include "front.h"

namespace front {

namespace {

// How long a stream ended by a draining server waits for the client to close it after the
// final snapshot (service/protocol/session.py FINAL_MESSAGE_GRACE_S).
constexpr std::chrono::seconds kFinalMessageGrace(2);

// One slice holding `data` (a serialized message).
grpc::ByteBuffer Buffer(std::string data) {
  grpc::Slice slice(std::move(data));
  return grpc::ByteBuffer(&slice, 1);
}

// The message's bytes, whole (a ByteBuffer may hold several slices).
std::string Bytes(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string data;
  if (!buffer.Dump(&slices).ok()) return data;
  data.reserve(buffer.Length());
  for (const auto& s : slices) data.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return data;
}

grpc::ByteBuffer Encode(const lstmserve::v1::StreamResponse& reply) {
  std::string data;
  reply.SerializeToString(&data);
  return Buffer(std::move(data));
}

}  // namespace

std::string CertCommonName(grpc::GenericCallbackServerContext* ctx) {
  auto auth = ctx->auth_context();
  if (!auth || !auth->IsPeerAuthenticated()) return "";
  auto names = auth->FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME);
  return names.empty() ? "" : std::string(names.front().data(), names.front().size());
}

NativeStream::NativeStream(grpc::GenericCallbackServerContext* ctx, Ticker* ticker, uint64_t id,
                           bool multi)
    : ctx_(ctx), ticker_(ticker), id_(id), multi_(multi) {
  const auto& metadata = ctx->client_metadata();
  auto found = metadata.find("authorization");
  if (found != metadata.end()) {
    authorization_.assign(found->second.data(), found->second.size());
    has_authorization_ = true;
  }
  cert_cn_ = CertCommonName(ctx);
  auto parent = metadata.find("traceparent");  // the parent of its messages' spans
  if (parent != metadata.end()) traceparent_.assign(parent->second.data(), parent->second.size());
  auto state = metadata.find("tracestate");
  if (state != metadata.end()) tracestate_.assign(state->second.data(), state->second.size());
}

void NativeStream::Begin(std::shared_ptr<NativeStream> self) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  self_ = std::move(self);
  reading_ = true;
  StartRead(&in_);
}

void NativeStream::OnReadDone(bool ok) {
  TickEntry entry;
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    reading_ = false;
    if (!ok) {  // half-closed (or cancelled: OnDone follows)
      eof_ = true;
      if (unanswered_ == 0 && !ended_) EndLocked(grpc::Status::OK);
      if (alarm_ && linger_) alarm_->Cancel();  // closed: the alarm runs now, and finishes
      PumpLocked();
      return;
    }
    if (ended_) {  // lingering after a final snapshot: read on, to see the client close
      if (linger_ && !finished_) {
        reading_ = true;
        StartRead(&in_);
      }
      return;
    }
    entry.set_stream(id_);
    std::string data = Bytes(in_);
    if (multi_) entry.set_multi_stream(true);
    bool parsed = multi_ ? entry.mutable_multi()->ParseFromString(data)
                         : entry.mutable_request()->ParseFromString(data);
    if (!parsed) {
      entry.clear_request();
      entry.clear_multi();
      entry.set_malformed(true);
      entry.set_size(static_cast<uint32_t>(data.size()));
    }
    if (!sent_) {
      entry.set_first(true);
      if (has_authorization_) {
        entry.set_has_authorization(true);
        entry.set_authorization(authorization_);
      }
      if (!cert_cn_.empty()) entry.set_cert_cn(cert_cn_);
      if (!traceparent_.empty()) entry.set_traceparent(traceparent_);
      if (!tracestate_.empty()) entry.set_tracestate(tracestate_);
    }
    sent_ = true;
    ++unanswered_;
  }
  ticker_->Submit(self_, std::move(entry));
}

bool NativeStream::Taken() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (ended_ || done_) {
    --unanswered_;
    return false;
  }
  return true;
}

// Called without the ticker's lock: gRPC may run the read's reaction (OnReadDone, which
// submits to the ticker) inline at the end of StartRead, on this thread.
void NativeStream::ReadAhead() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (!eof_ && !reading_ && !ended_ && !done_) {  // one message read ahead of the answers
    reading_ = true;
    StartRead(&in_);
  }
}

bool NativeStream::Known() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  return sent_ && !ended_ && !done_;
}

// A draining server does not know this call if it sent nothing yet: as the Python front, a
// StreamMulti call ends at once, a Stream call if its first message does not come in time (it
// goes to the server, which answers it; cut off while the client writes it, the client would
// see INTERNAL rather than the status).
void NativeStream::Drain(const DrainNotice& notice) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (sent_ || ended_ || done_ || first_alarm_) return;
  drain_status_ = notice.status;
  if (multi_ || notice.first_message.count() <= 0) {
    EndLocked(drain_status_);
    PumpLocked();
    return;
  }
  std::weak_ptr<NativeStream> weak = self_;  // the alarm never keeps it alive
  first_alarm_ = std::make_unique<grpc::Alarm>();
  first_alarm_->Set(std::chrono::system_clock::now() + notice.first_message, [weak](bool ok) {
    if (auto stream = weak.lock(); stream && ok) stream->FirstMessageDue();
  });
}

void NativeStream::FirstMessageDue() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (sent_ || ended_ || done_) return;
  EndLocked(drain_status_);
  PumpLocked();
}

void NativeStream::Answer(const TickOutcome& outcome) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  --unanswered_;
  OutcomeLocked(outcome);
}

void NativeStream::Push(const TickOutcome& outcome) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  OutcomeLocked(outcome);
}

void NativeStream::OutcomeLocked(const TickOutcome& outcome) {
  const auto& reply = outcome.reply();
  if (reply.has_opened()) {  // what packed chunk replies are written with (kept even if ended)
    session_id_ = reply.session_id();
    labels_.assign(reply.opened().labels().begin(), reply.opened().labels().end());
    top_k_ = reply.opened().options().top_k();
  }
  if (ended_ || done_) return;
  if (multi_ ? outcome.has_multi_reply() : outcome.has_reply()) {
    out_.push_back(multi_ ? Buffer(outcome.multi_reply()) : Encode(reply));
  }
  if (outcome.code() != 0) {
    EndLocked(grpc::Status(static_cast<grpc::StatusCode>(outcome.code()), outcome.message()));
    // A draining server's final snapshot(s): as the Python front, wait (2 s at most) for the
    // client to close the stream before ending it, so a client writing meanwhile keeps it.
    // StreamMulti's reply with a status is only ever that last message.
    bool last = multi_ ? outcome.has_multi_reply()
                       : reply.has_snapshot() && reply.snapshot().final();
    linger_ = last && !eof_;
    if (linger_ && !reading_) {
      reading_ = true;
      StartRead(&in_);
    }
  } else if (outcome.finish() || (eof_ && unanswered_ == 0)) {
    EndLocked(grpc::Status::OK);
  }
  PumpLocked();
}

size_t NativeStream::Classes() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  return labels_.size();
}

// A plain chunk reply from the tick's packed columns: the fields codec.fill_chunk_result sets,
// the top labels as codec.add_top_labels picks them (argmax, the first of ties, for one; a
// stable sort by descending probability for more).
void NativeStream::AnswerPacked(const Packed& p) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  --unanswered_;
  if (ended_ || done_) return;
  lstmserve::v1::StreamResponse reply;
  reply.set_session_id(session_id_);
  auto* chunk = reply.mutable_chunk();
  chunk->set_seq(p.seq);
  chunk->set_steps(p.steps);
  chunk->set_total_steps(p.total_steps);
  chunk->set_duplicate(p.duplicate);
  chunk->set_held_characters(p.held_characters);
  chunk->set_rewound_steps(p.rewound_steps);
  if (p.probabilities != nullptr && !labels_.empty()) {
    const size_t classes = labels_.size();
    chunk->mutable_probabilities()->Add(p.probabilities, p.probabilities + classes);
    size_t k = std::min<size_t>(std::max<uint32_t>(top_k_, 1), classes);
    std::vector<uint32_t> order(classes);
    for (uint32_t i = 0; i < classes; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
      return p.probabilities[a] > p.probabilities[b];
    });
    for (size_t j = 0; j < k; ++j) {
      auto* top = chunk->add_top();
      top->set_label(labels_[order[j]]);
      top->set_index(order[j]);
      top->set_probability(p.probabilities[order[j]]);
    }
  }
  out_.push_back(Encode(reply));
  if (eof_ && unanswered_ == 0) EndLocked(grpc::Status::OK);
  PumpLocked();
}

void NativeStream::Fail(const grpc::Status& status) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (ended_ || done_) return;
  EndLocked(status);
  PumpLocked();
}

void NativeStream::EndLocked(const grpc::Status& status) {
  ended_ = true;
  status_ = status;
}

// Starts the next write, or finishes once every reply is written and the status decided.
void NativeStream::PumpLocked() {
  if (writing_ || done_ || finished_) return;
  if (!out_.empty()) {
    writing_ = true;
    StartWrite(&out_.front());
    return;
  }
  if (!ended_) return;
  if (linger_) {
    if (eof_ && !alarm_) {
      linger_ = false;  // the client closed already: nothing to wait for
    } else {
      if (!alarm_) {  // this stays alive until the alarm ran: Finish waits for it
        alarm_ = std::make_unique<grpc::Alarm>();
        alarm_->Set(std::chrono::system_clock::now() + kFinalMessageGrace,
                    [this](bool) { EndLinger(); });
      }
      return;
    }
  }
  finished_ = true;
  Finish(status_);
}

void NativeStream::EndLinger() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  linger_ = false;
  PumpLocked();
}

void NativeStream::OnWriteDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  writing_ = false;
  out_.pop_front();
  if (!ok) {  // the client is gone
    out_.clear();
    if (!ended_) EndLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
  }
  PumpLocked();
}

void NativeStream::OnDone() {
  bool clean;
  std::shared_ptr<NativeStream> keep;
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    done_ = true;
    clean = finished_ && status_.ok() && !ctx_->IsCancelled();
    keep = std::move(self_);
  }
  ticker_->Closed(id_, clean);
}  // `keep` may delete this here: nothing runs after it

}  // namespace front
