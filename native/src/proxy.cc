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
    client_.StartRead(&from_upstream_);
    client_.StartCall();
    StartRead(&from_client_);
  }

  // Client -> upstream.
  void OnReadDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (upstream_done_) return;  // the call is over: nothing more goes up
    if (ok) {
      client_.StartWrite(&from_client_);
    } else {
      client_.StartWritesDone();
    }
  }
  void UpstreamWriteDone(bool ok) {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (ok && !finished_) StartRead(&from_client_);
  }

  // Upstream -> client.
  void UpstreamReadDone(bool ok) {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (!ok) return;  // the status comes with UpstreamDone
    writing_ = true;
    StartWrite(&from_upstream_);
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      upstream_ctx_.TryCancel();
    } else if (!upstream_done_) {
      client_.StartRead(&from_upstream_);
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
  bool writing_ = false, upstream_done_ = false, finished_ = false;
  int refs_ = 2;  // OnDone and the upstream call's OnDone
  grpc::Status status_;
};

}  // namespace

grpc::ServerGenericBidiReactor* StartProxy(grpc::GenericCallbackServerContext* ctx,
                                           grpc::GenericStub* upstream) {
  return new Proxy(ctx, upstream);
}

}  // namespace front
