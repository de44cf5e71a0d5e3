// Proxy: any method but Stream, forwarded as bytes to the Python server on its Unix socket.
#include <string>

#include "front.h"

namespace front {

namespace {

bool Forwarded(const std::string& key) {
  if (key.empty() || key[0] == ':') return false;
  if (key.rfind("grpc-", 0) == 0) return false;  // the transport's own (deadline: set below)
  return key != "content-type" && key != "te" && key != "user-agent" && key != "host" &&
         key != kCertCnKey;  // only the front says who a certificate names
}

// Both calls' operations are started from the other call's reactions, so the upstream call
// carries two holds (gRPC's rule for operations started outside a call's own reactions): one
// for the flow of writes to it, one for the flow of reads from it. Without them the upstream
// call's state is destroyed as soon as its status arrives with nothing in flight (the server
// behind it went away, or answered before the client's half-close was forwarded), and the next
// StartWrite / StartWritesDone / StartRead from the client's side used freed memory: the
// front's "pure virtual method called" aborts and heap corruption under bench.chaos --native.
class Proxy : public grpc::ServerGenericBidiReactor {
 public:
  Proxy(grpc::GenericCallbackServerContext* ctx, grpc::GenericStub* upstream)
      : ctx_(ctx), client_(this) {
    for (const auto& [k, v] : ctx->client_metadata()) {
      std::string key(k.data(), k.size());
      if (Forwarded(key)) upstream_ctx_.AddMetadata(key, std::string(v.data(), v.size()));
    }
    std::string cn = CertCommonName(ctx);
    if (!cn.empty()) upstream_ctx_.AddMetadata(kCertCnKey, cn);
    if (ctx->deadline() != std::chrono::system_clock::time_point::max()) {
      upstream_ctx_.set_deadline(ctx->deadline());
    }
    upstream->PrepareBidiStreamingCall(&upstream_ctx_, ctx->method(), {}, &client_);
    std::lock_guard<std::recursive_mutex> lock(mu_);
    client_.AddMultipleHolds(2);  // the write flow and the read flow (before StartCall)
    client_.StartRead(&from_upstream_);
    client_.StartCall();
    StartRead(&from_client_);
  }

  // Client -> upstream: one message at a time, then the half-close.
  void OnReadDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (!write_hold_) return;  // the upstream call is over: nothing more goes up
    if (ok && !upstream_closed_) {
      upstream_writing_ = true;
      client_.StartWrite(&from_client_);
      return;
    }
    if (!ok && !upstream_closed_) client_.StartWritesDone();
    DropWriteHoldLocked();  // no write follows
  }
  void UpstreamWriteDone(bool ok) {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    upstream_writing_ = false;
    if (ok && !upstream_closed_) {
      StartRead(&from_client_);
    } else {
      DropWriteHoldLocked();  // the upstream call is broken or over: its status follows
    }
  }

  // Upstream -> client: one message at a time; the status comes with UpstreamDone.
  void UpstreamReadDone(bool ok) {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (!ok) {  // the upstream call is over (or broken): no read or write follows
      upstream_closed_ = true;
      DropReadHoldLocked();
      if (!upstream_writing_) DropWriteHoldLocked();  // else UpstreamWriteDone drops it
      return;
    }
    writing_ = true;
    StartWrite(&from_upstream_);
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    writing_ = false;
    if (ok) {
      client_.StartRead(&from_upstream_);  // the read hold is held: the call is not over
    } else {  // the client is gone: no more reads from upstream, and the call is cancelled
      upstream_ctx_.TryCancel();
      DropReadHoldLocked();
    }
    FinishLocked();
  }

  void UpstreamDone(const grpc::Status& status) {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    for (const auto& [k, v] : upstream_ctx_.GetServerTrailingMetadata()) {
      std::string key(k.data(), k.size());
      if (Forwarded(key)) ctx_->AddTrailingMetadata(key, std::string(v.data(), v.size()));
    }
    upstream_done_ = true;
    status_ = status;
    FinishLocked();
  }

  void OnCancel() override { upstream_ctx_.TryCancel(); }

  void OnDone() override { Release(); }
  void Release() {
    bool last;
    {
      std::lock_guard<std::recursive_mutex> lock(mu_);
      last = --refs_ == 0;
    }
    if (last) delete this;
  }

 private:
  void FinishLocked() {
    if (upstream_done_ && !writing_ && !finished_) {
      finished_ = true;
      Finish(status_);
    }
  }
  // RemoveHold never runs OnDone inline (it is scheduled), so these are safe under mu_.
  void DropWriteHoldLocked() {
    if (!write_hold_) return;
    write_hold_ = false;
    client_.RemoveHold();
  }
  void DropReadHoldLocked() {
    if (!read_hold_) return;
    read_hold_ = false;
    client_.RemoveHold();
  }

  class Client : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    explicit Client(Proxy* proxy) : proxy_(proxy) {}
    void OnWriteDone(bool ok) override { proxy_->UpstreamWriteDone(ok); }
    void OnReadDone(bool ok) override { proxy_->UpstreamReadDone(ok); }
    void OnDone(const grpc::Status& status) override {
      proxy_->UpstreamDone(status);
      proxy_->Release();
    }

   private:
    Proxy* proxy_;
  };

  grpc::GenericCallbackServerContext* ctx_;
  grpc::ClientContext upstream_ctx_;
  Client client_;
  std::recursive_mutex mu_;
  grpc::ByteBuffer from_client_, from_upstream_;
  bool writing_ = false;           // a message is being written to the client
  bool upstream_writing_ = false;  // a message is being written upstream
  bool upstream_closed_ = false;   // the upstream call's reads ended: it is over
  bool write_hold_ = true, read_hold_ = true;  // the upstream call's two holds, until dropped
  bool upstream_done_ = false, finished_ = false;
  int refs_ = 2;  // OnDone and the upstream call's OnDone
  grpc::Status status_;
};

}  // namespace

grpc::ServerGenericBidiReactor* StartProxy(grpc::GenericCallbackServerContext* ctx,
                                           grpc::GenericStub* upstream) {
  return new Proxy(ctx, upstream);
}

}  // namespace front
