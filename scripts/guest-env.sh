# The environment every program in a pexi guest starts with: sourced by the guest image's init
# (scripts/vm-image puts it in the image as /etc/pexi/guest-env.sh) and by the compatibility test
# (compat/), so that what the test proves is what the image does. It needs $PEXI_CA, the file pexi-guestd
# wrote its per-boot CA to; whoever sources it has also made that CA the system trust store
# (/etc/ssl/certs/ca-certificates.crt and the other bundle paths TLS libraries read by default).

# The proxy, in both spellings: curl reads only the lower-case http_proxy for http:// URLs.
export HTTP_PROXY=http://127.0.0.1:3128 HTTPS_PROXY=http://127.0.0.1:3128
export http_proxy=$HTTP_PROXY https_proxy=$HTTPS_PROXY
export NO_PROXY=localhost,127.0.0.1,::1 no_proxy=localhost,127.0.0.1,::1
# The CA in the variables curl, git, Python (requests, and OpenSSL under urllib) and Node read.
export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt SSL_CERT_DIR=/etc/ssl/certs
export CURL_CA_BUNDLE=$SSL_CERT_FILE REQUESTS_CA_BUNDLE=$SSL_CERT_FILE GIT_SSL_CAINFO=$SSL_CERT_FILE
export NODE_EXTRA_CA_CERTS=$PEXI_CA
# Node >= 24 (and 22.21) uses the proxy variables for fetch and http(s) from process start. Programs that
# ignore all of this (ws, Node 20) resolve names through pexi-guestd's DNS stub (transparent mode).
export NODE_USE_ENV_PROXY=1
